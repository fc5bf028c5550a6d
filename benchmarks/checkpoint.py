"""Checkpoint save and load throughput, how long an async save blocks training, and what the
per-file CRC32 checksums add to it, against a plain torch.save / torch.load of the same tensors.

    python benchmarks/checkpoint.py                                  # ~50 M parameters, one process
    python benchmarks/checkpoint.py model.num_layers=16 --repeats 5
    torchrun --nproc-per-node 2 benchmarks/checkpoint.py parallel.tp=2

The state is what goku-train checkpoints: weights, fp32 EMA, and the distributed optimizer's fp32
main weights and Adam moments (after one optimizer step, so that they exist). "MB" is the size on
disk. Each figure is the median over ``--repeats`` runs; the first call also pays one-time
set-up (planning caches; for the async saves the allocation of the snapshot's buffers) and is
shown apart. The process's first checkpoint save is an async one, as in goku-train, so the first
async save's blocking time also holds whatever a process pays once for its first save (megatron's
results queue was a spawned Manager process on GPU before goku installed its own everywhere); a
line sets it beside the later ones and says how many processes the first save left running. The
async saves go to one Checkpointer each, as in a run: its snapshot buffers are allocated by the
first save and reused by the next. "until complete" is the async save's blocking part plus the
wait for its writer thread. The "no checksums" rows save with the
hashing switched off, so the "checksums add" line is what hashing adds to the time a save
blocks training (an async save's writer thread hashes the files it wrote; a sync save hashes
them in line). The optimizer-step rows time an AdamW step plus the EMA update (random
gradients, the same each time), alone and right after an async save returned, while its writer thread writes: what
the writer costs the training that goes on beside it. As goku-train does, the objects built at
set-up are frozen out of garbage collection (gc.freeze). Not a test: figures depend on the
machine and its disk.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _plain_state(training) -> dict[str, torch.Tensor]:
    """The same tensors as one flat dict for torch.save."""
    state = {f"model.{n}": p.detach() for n, p in training.model[0].named_parameters()}
    if training.ema is not None:
        state.update({f"ema.{i}": t for i, t in enumerate(training.ema.averages)})
    for part in training.optimizer.inner.chained_optimizers:
        for i, (param, s) in enumerate(part.optimizer.state.items()):
            state[f"optimizer.{i}.param"] = param.detach()
            state.update({f"optimizer.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return state


@contextlib.contextmanager
def _no_checksums():
    """Saves without the per-file CRC32 (the manifest records empty checksums)."""
    from goku_megatron.checkpoint import save

    saved = save.record_checksums, save.file_crc32
    save.record_checksums, save.file_crc32 = (lambda directory, rank: None), (lambda path: "")
    try:
        yield
    finally:
        save.record_checksums, save.file_crc32 = saved


def _fsynced_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from goku_megatron import cpu_compat
    from goku_megatron.checkpoint import Checkpointer, TrainingState, load_checkpoint
    from goku_megatron.config import load_config, validate
    from goku_megatron.platform import has_cuda, shutdown_distributed, world_size_from_env
    from goku_megatron.train import setup

    cfg = load_config(None, ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=2048",
                             "model.num_heads=8", "model.text_dim=512", *args.overrides])
    validate(cfg, world_size_from_env(), has_cuda=has_cuda())
    cpu_compat.apply()
    training = setup(cfg)
    for p in training.model[0].parameters():  # one optimizer step creates the Adam state
        p.main_grad.normal_(generator=torch.Generator().manual_seed(0))
    training.optimizer.step()
    gc.freeze()  # as goku-train does after set-up
    state = TrainingState(training.model, training.optimizer, training.scheduler, training.ema)

    def optimizer_step() -> None:  # what a training step does to the saved state (same gradients)
        training.optimizer.step()
        if training.ema is not None:
            training.ema.update()
    rank = torch.distributed.get_rank()
    root = Path(args.dir or tempfile.mkdtemp(prefix="goku-ckpt-bench-"))
    if args.dir:
        root.mkdir(parents=True, exist_ok=True)
    shared = [str(root)]
    torch.distributed.broadcast_object_list(shared, src=0)
    root = Path(shared[0])

    def timed(fn) -> float:
        torch.distributed.barrier()
        start = time.perf_counter()
        fn()
        torch.distributed.barrier()
        return time.perf_counter() - start

    results: dict[str, list[float]] = {k: [] for k in (
        "torch_save", "torch_load", "sync_save", "async_block", "async_snapshot", "async_total", "load",
        "sync_save_nohash", "async_block_nohash", "opt_step", "opt_step_writing")}
    first: dict[str, float] = {}
    plain = _plain_state(training)
    plain_path = root / f"plain_rank{rank}.pt"
    async_ck = Checkpointer(root / "async", keep_last=1, async_save=True)
    bare_async_ck = Checkpointer(root / "bare_async", keep_last=1, async_save=True)
    step = 0
    children_before = len(multiprocessing.active_children())
    children_started = 0
    for repeat in range(args.repeats + 1):
        results["torch_save"].append(timed(lambda: _fsynced_save(plain, plain_path)))
        results["torch_load"].append(timed(lambda: torch.load(plain_path, map_location="cpu")))
        step += 1
        blocked: list[float] = []
        results["async_total"].append(timed(lambda: (blocked.append(async_ck.save(step, state, cfg.to_dict())),
                                                     async_ck.wait())))
        results["async_block"].append(blocked[0])
        results["async_snapshot"].append(async_ck.last_snapshot_s)
        if repeat == 0:  # the process's first checkpoint save
            children_started = len(multiprocessing.active_children()) - children_before
        sync_run = root / f"sync{repeat}"
        results["sync_save"].append(timed(lambda: Checkpointer(sync_run).save(step, state, cfg.to_dict(),
                                                                             blocking=True)))
        results["load"].append(timed(lambda: load_checkpoint(sync_run / "checkpoints" / f"iter_{step:07d}", state)))
        results["opt_step"].append(timed(optimizer_step))
        async_ck.save(step, state, cfg.to_dict())  # the same step again: its writer runs beside the next step
        results["opt_step_writing"].append(timed(optimizer_step))
        async_ck.wait()
        with _no_checksums():
            bare = root / f"bare{repeat}"
            results["sync_save_nohash"].append(timed(lambda: Checkpointer(bare).save(step, state, cfg.to_dict(),
                                                                                    blocking=True)))
            results["async_block_nohash"].append(bare_async_ck.save(step, state, cfg.to_dict()))
            bare_async_ck.wait()
        if repeat == 0:  # one-time costs: report apart, time the rest
            first = {k: v.pop() for k, v in results.items()}
    snapshot_mb = torch.tensor([async_ck.snapshot_bytes / 1e6], dtype=torch.float64)
    torch.distributed.all_reduce(snapshot_mb, op=torch.distributed.ReduceOp.MAX)
    async_ck.close()
    bare_async_ck.close()
    plain_bytes = torch.tensor([os.path.getsize(plain_path)], dtype=torch.float64)
    torch.distributed.all_reduce(plain_bytes)
    torch_mb = plain_bytes.item() / 1e6
    dist_mb = _dir_bytes(root / "sync0" / "checkpoints" / "iter_0000001") / 1e6
    if rank == 0:
        params = sum(p.numel() for p in training.model[0].parameters())
        print(f"model: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, {params:,} parameters per rank; "
              f"world {torch.distributed.get_world_size()} (tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
              f"dp={cfg.parallel.dp}); optimizer distributed={cfg.optim.distributed_optimizer}; "
              f"EMA {'on' if training.ema is not None else 'off'}; median of {args.repeats}")
        print(f"checkpoint: dist_checkpointing {dist_mb:.1f} MB on disk; torch.save of the same tensors "
              f"{torch_mb:.1f} MB")
        rows = [("torch.save (fsync)", "torch_save", torch_mb), ("torch.load", "torch_load", torch_mb),
                ("dist save, sync", "sync_save", dist_mb), ("dist save, async: blocking", "async_block", None),
                ("dist save, async: of which the snapshot", "async_snapshot", snapshot_mb.item()),
                ("dist save, async: until complete", "async_total", dist_mb), ("dist load (load_checkpoint)", "load", dist_mb),
                ("dist save, sync, no checksums", "sync_save_nohash", dist_mb),
                ("dist save, async: blocking, no checksums", "async_block_nohash", None),
                ("optimizer step + EMA, no save in flight", "opt_step", None),
                ("optimizer step + EMA, beside the writer", "opt_step_writing", None)]
        print(f"| {'operation':<40} | {'seconds':>8} | {'MB/s':>7} | {'first call, s':>13} |")
        print(f"|{'-' * 42}|{'-' * 10}|{'-' * 9}|{'-' * 15}|")
        for label, key, mb in rows:
            seconds = statistics.median(results[key])
            rate = f"{mb / seconds:7.0f}" if mb else "      -"
            print(f"| {label:<40} | {seconds:8.3f} | {rate} | {first[key]:13.3f} |")
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"an async save blocks training {100 * med['async_block'] / med['sync_save']:.1f}% as long as a sync "
              f"save ({med['async_block']:.3f} s of {med['sync_save']:.3f} s); the writer's snapshot holds "
              f"{snapshot_mb.item():.1f} MB per rank (at most, over ranks) from one async save to the next")
        print(f"checksums add {100 * (med['async_block'] / med['async_block_nohash'] - 1):+.1f}% to an async "
              f"save's blocking time and {100 * (med['sync_save'] / med['sync_save_nohash'] - 1):+.1f}% to a sync save")
        print(f"the first async save (this process's first checkpoint save) blocked training "
              f"{first['async_block']:.3f} s, later ones {med['async_block']:.3f} s (median of {args.repeats}); "
              f"processes the first save left running on rank 0: {children_started}")
    torch.distributed.barrier()
    if rank == 0 and not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
