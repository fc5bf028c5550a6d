"""Checkpoints in one process: what they hold, atomic publication, validation and fall-back,
incompatible models refused, exact resume (toy and packed loaders), preemption, NaN steps.

The runs here are goku-train's own loop (train.run) in the test process's one-rank megatron world;
tests/test_checkpoint_dist.py does the same across processes (DP=2, TP=2, PP=2, kills)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoint_utils import adam_steps, assert_same_tensors, checkpoint_tensors, losses, metrics
from conftest import TOY_CHECKPOINT_RUN, build_stage, one_process_world
from numerics import assert_close_to_scale

from goku_megatron.checkpoint import (
    Checkpointer,
    TrainingState,
    checkpoint_dir,
    choose_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_loader_state,
    load_model_weights,
    newest_valid_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from goku_megatron.config import ConfigError, load_config, validate
from goku_megatron.resilience import Diverged, Preempted

pytestmark = pytest.mark.usefixtures("megatron_world")  # goku-train's loop in this process's one-rank world


def _cfg(toy_data: Path, run_dir: Path, *extra: str):
    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={run_dir}",
                              "train.save_interval=3", *extra])
    validate(cfg, 1)
    return cfg


def _run(cfg, source=None):
    from goku_megatron.train import run

    return run(cfg, source)


class _Interfere:
    """The run's own data source, with a hook that runs when a given step's packs are drawn (the
    loader state passes through, so checkpoints hold it)."""

    def __init__(self, cfg, at: dict[int, callable]):
        from goku_megatron.data.pipeline import build_data_source
        from goku_megatron.platform import choose_backends, init_distributed

        init_distributed(cfg, choose_backends(cfg))  # the source's toy-data barrier needs the group
        self.source = build_data_source(cfg, 0, 1, torch.device("cpu"))
        self.at = at

    @property
    def bad(self):
        return self.source.bad

    def close(self):
        self.source.close()

    def next_step(self, step):
        packs = self.source.next_step(step)
        if step in self.at:
            packs = self.at[step](packs) or packs
        return packs

    @property
    def stop_requested(self):
        return self.source.stop_requested

    @stop_requested.setter
    def stop_requested(self, flag):
        self.source.stop_requested = flag

    def mark(self):
        return self.source.mark()

    def rollback(self, mark):
        self.source.rollback(mark)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def _nan(packs):
    noisy = packs[0].noisy.clone()
    noisy[0, 0] = float("nan")
    return [dataclasses.replace(packs[0], noisy=noisy), *packs[1:]]


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory):
    """Six uninterrupted steps, checkpoints at 3 and 6."""
    one_process_world()
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    results = _run(_cfg(toy_data, run_dir))
    assert [r.skipped for r in results] == [False] * 6
    return run_dir


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds and how it is published


def test_checkpoint_holds_everything_a_resume_needs(reference):
    from megatron.core import dist_checkpointing

    path = latest_checkpoint(reference)
    assert path.name == "iter_0000006" and validate_checkpoint(path) is None
    tensors = checkpoint_tensors(path)
    weights = {k[len("model."):] for k in tensors if k.startswith("model.")}
    assert {k[len("ema."):] for k in tensors if k.startswith("ema.")} == weights
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        assert {k.split(".model.", 1)[1] for k in tensors if k.startswith(f"optimizer.state.{kind}.")} == weights
    assert adam_steps(path) == [6.0] * len(adam_steps(path))
    common = dist_checkpointing.load_common_state_dict(str(path))
    assert common["step"] == 6 and common["config"]["model"]["hidden_size"] == 64
    assert common["train_state"]["consumed_samples"] == 6 * 8
    assert common["scheduler"]["num_steps"] == 6
    assert (path / "loader_dp00000.json").is_file()
    # fp32 EMA, updated after each step, and loadable in place of the weights (for sampling)
    assert tensors["ema.final_layer.linear.weight"].dtype == torch.float32
    assert not torch.equal(tensors["ema.layers.0.attn1.q_proj.weight"], tensors["model.layers.0.attn1.q_proj.weight"])
    cfg = load_config("toy", TOY_CHECKPOINT_RUN)
    validate(cfg, 1)
    stage = build_stage(cfg)
    assert load_model_weights(path, [stage], ema=True)["step"] == 6
    for name, param in stage.named_parameters():
        assert torch.equal(param, tensors[f"ema.{name}"]), name


def test_ema_follows_each_optimizer_step(megatron_world):
    from goku_megatron.ema import EMA

    cfg = load_config(None, ["model.zero_init=false"])
    validate(cfg, 1)
    stage = build_stage(cfg)
    ema = EMA([stage], decay=0.9)
    start = {n: p.detach().clone() for n, p in stage.named_parameters()}
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)
    ema.update()
    ema.update()
    for (name, p), avg in zip(stage.named_parameters(), ema.averages):
        # two steps towards start+1: start + 1 - 0.9**2
        assert_close_to_scale(avg, start[name] + 1 - 0.81, ulps=16, msg=name)


def test_keep_last_and_the_latest_pointer(tmp_path, megatron_world):
    cfg = load_config(None, [])
    validate(cfg, 1)
    state = TrainingState([build_stage(cfg)])
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, state, cfg.to_dict(), blocking=True)
        assert latest_checkpoint(tmp_path).name == f"iter_{step:07d}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000003", "iter_0000004", "latest"]


def test_interrupted_save_never_becomes_latest(tmp_path, megatron_world):
    cfg = load_config(None, [])
    validate(cfg, 1)
    path = save_checkpoint(tmp_path, 4, [build_stage(cfg)], cfg.to_dict())
    # a crash in the middle of saving step 5: its directory is still .partial
    partial = checkpoint_dir(tmp_path, 5).with_name("iter_0000005.partial")
    shutil.copytree(path, partial)
    (partial / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == path
    assert newest_valid_checkpoint(tmp_path) == (path, [])
    # ... and one that wrote everything (its manifest too) but crashed before its rename
    complete = checkpoint_dir(tmp_path, 6).with_name("iter_0000006.partial")
    shutil.copytree(path, complete)
    Checkpointer(tmp_path).remove_leftovers()
    assert not partial.exists() and validate_checkpoint(path) is None
    assert not complete.exists() and latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 6)


def test_async_save_snapshots_the_weights_when_it_returns(tmp_path, megatron_world):
    cfg = load_config(None, ["model.zero_init=false"])
    validate(cfg, 1)
    stage = build_stage(cfg)
    saved = {n: p.detach().clone() for n, p in stage.named_parameters()}
    checkpointer = Checkpointer(tmp_path, async_save=True)
    blocked = checkpointer.save(1, TrainingState([stage]), cfg.to_dict())
    assert blocked > 0 and latest_checkpoint(tmp_path) is None  # written in the background
    with torch.no_grad():  # training goes on and changes the weights in place
        for p in stage.parameters():
            p.add_(1.0)
    checkpointer.close()
    assert latest_checkpoint(tmp_path).name == "iter_0000001"
    fresh = build_stage(cfg)
    load_model_weights(latest_checkpoint(tmp_path), [fresh])
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name


def _training(*extra: str):
    """The toy run's model, optimizer (the distributed one unless ``extra`` says otherwise), LR
    schedule and EMA in this process's one-rank world, after one optimizer step."""
    from goku_megatron.train import setup

    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, *extra])
    validate(cfg, 1)
    training = setup(cfg)
    _optimizer_step(training, seed=0)
    return cfg, training, TrainingState(training.model, training.optimizer, training.scheduler, training.ema)


def _optimizer_step(training, seed: int) -> None:
    """What a training step does to the state a checkpoint holds: an optimizer step on (seeded)
    gradients, then the EMA update."""
    gen = torch.Generator().manual_seed(seed)
    for p in training.model[0].parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    training.optimizer.step()
    training.scheduler.step(1)
    training.ema.update()


def _optimizer_tensors(training) -> dict[str, torch.Tensor]:
    """The optimizer's main weights and Adam state, by position."""
    from goku_megatron.checkpoint.optimizer_state import optimizer_parts

    out = {}
    for i, part in enumerate(optimizer_parts(training.optimizer)):
        for g, group in enumerate(part.optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                out[f"{i}.{g}.{j}.param"] = param.detach()
                out.update({f"{i}.{g}.{j}.{k}": v for k, v in part.optimizer.state[param].items()})
    return out


def _copy_of(training) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds of ``training``, copied now."""
    tensors = {f"model.{n}": p for n, p in training.model[0].named_parameters()}
    tensors.update({f"ema.{i}": a for i, a in enumerate(training.ema.averages)})
    tensors.update({f"optimizer.{k}": v for k, v in _optimizer_tensors(training).items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_the_distributed_optimizer_checkpoint_is_megatrons_without_its_gather(tmp_path, megatron_world, monkeypatch):
    """Each rank writes its own shards (checkpoint/optimizer_state.py, _own_shards_fully_reshardable):
    the checkpoint holds what megatron's gathered fully_reshardable format holds, bit for bit, and each loads the
    other's (tests/test_checkpoint_dist.py checks DP=2 and TP=2)."""
    from megatron.core import dist_checkpointing

    from goku_megatron.checkpoint import optimizer_state
    from goku_megatron.checkpoint import save as checkpoint_save

    cfg, training, state = _training()
    _optimizer_step(training, seed=1)
    Checkpointer(tmp_path / "own").save(2, state, cfg.to_dict(), blocking=True)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_save, "optimizer_sharded_state_dict", lambda optimizer, model_sd: optimizer_state.unwrapped(
            optimizer).sharded_state_dict(model_sd, metadata=optimizer_state.optimizer_metadata()))
        Checkpointer(tmp_path / "gathered").save(2, state, cfg.to_dict(), blocking=True)
    own, gathered = checkpoint_dir(tmp_path / "own", 2), checkpoint_dir(tmp_path / "gathered", 2)
    assert_same_tensors(checkpoint_tensors(own), checkpoint_tensors(gathered))
    assert all(dist_checkpointing.load_common_state_dict(str(own))[k] == dist_checkpointing.load_common_state_dict(
        str(gathered))[k] for k in ("optimizer", "scheduler", "step"))
    at_save = _copy_of(training)
    for path in (own, gathered):
        _, fresh, fresh_state = _training()
        load_checkpoint(path, fresh_state)
        loaded = _copy_of(fresh)
        assert all(torch.equal(loaded[k], v) for k, v in at_save.items()), path.parent.parent.name


def test_plain_and_distributed_optimizer_checkpoints_load_into_each_other(tmp_path, megatron_world, monkeypatch):
    """Without the distributed optimizer (the toy recipe's DDP; FSDP's) the optimizer is written in
    the distributed optimizer's fully_reshardable format too: its checkpoint resumes under the
    distributed optimizer, whose checkpoint resumes it back, every tensor and the Adam step exact.
    A checkpoint in megatron's own plain-optimizer format (what goku wrote before) still resumes a
    plain optimizer exactly, and the distributed optimizer refuses it in one line."""
    from goku_megatron.checkpoint import optimizer_state
    from goku_megatron.checkpoint import save as checkpoint_save

    cfg, plain, plain_state = _training("optim.distributed_optimizer=false")
    _optimizer_step(plain, seed=1)
    at_save = _copy_of(plain)
    Checkpointer(tmp_path / "plain").save(2, plain_state, cfg.to_dict(), blocking=True)
    saved = checkpoint_dir(tmp_path / "plain", 2)
    assert adam_steps(saved) == [2.0] * len(adam_steps(saved))

    dist_cfg, _, dist_state = _training()
    load_checkpoint(saved, dist_state)
    Checkpointer(tmp_path / "dist").save(2, dist_state, dist_cfg.to_dict(), blocking=True)
    resaved = checkpoint_dir(tmp_path / "dist", 2)
    assert_same_tensors(checkpoint_tensors(resaved), checkpoint_tensors(saved))
    assert adam_steps(resaved) == adam_steps(saved)
    _, back, back_state = _training("optim.distributed_optimizer=false")
    load_checkpoint(resaved, back_state)
    loaded = _copy_of(back)
    assert all(torch.equal(loaded[k], v) for k, v in at_save.items())

    with monkeypatch.context() as patch:  # megatron's own format for a plain optimizer
        patch.setattr(checkpoint_save, "optimizer_sharded_state_dict", lambda optimizer, model_sd: optimizer_state.unwrapped(
            optimizer).sharded_state_dict(model_sd, metadata=optimizer_state.optimizer_metadata()))
        Checkpointer(tmp_path / "legacy").save(2, plain_state, cfg.to_dict(), blocking=True)
    legacy = checkpoint_dir(tmp_path / "legacy", 2)
    _, old, old_state = _training("optim.distributed_optimizer=false")
    load_checkpoint(legacy, old_state)
    loaded = _copy_of(old)
    assert all(torch.equal(loaded[k], v) for k, v in at_save.items())
    _, _, dist_state = _training()
    with pytest.raises(ConfigError, match=r"megatron's plain-optimizer format, which only a run with "
                                          r"optim.distributed_optimizer=false and parallel.fsdp=false reads"):
        load_checkpoint(legacy, dist_state)


def test_flat_ranges_are_cut_into_boxes_that_cover_them_exactly():
    """A rank's range of a flattened weight, as boxes of the weight's shape: in flat order, each
    box the elements it claims, together every element of the range once and nothing else."""
    from goku_megatron.checkpoint import flat_range_boxes

    for shape in [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (5, 2, 3, 2)]:
        n = math.prod(shape)
        index = torch.arange(n).reshape(shape)
        for start in range(n + 1):
            for stop in range(start, n + 1):
                boxes = flat_range_boxes(shape, start, stop)
                assert len(boxes) <= 2 * len(shape) - 1
                covered, position = torch.zeros(shape, dtype=torch.int64), start
                for offset, box, first in boxes:
                    where = tuple(slice(o, o + k) for o, k in zip(offset, box))
                    assert first == position
                    assert torch.equal(index[where].reshape(-1), torch.arange(first, first + math.prod(box)))
                    covered[where] += 1
                    position += math.prod(box)
                assert position == stop
                want = torch.zeros(n, dtype=torch.int64)
                want[start:stop] = 1
                assert torch.equal(covered.reshape(-1), want)


class _HeldWriter:
    """Holds the checkpoint writer thread before it writes the checkpoint whose path contains
    ``name`` until ``release`` is set (at most ``limit`` seconds: a test never waits forever)."""

    def __init__(self, monkeypatch, name: str = "", limit: float = 120.0):
        from goku_megatron.checkpoint import writer as checkpoint_writer

        self.name, self.limit = name, limit
        self.writing, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        self.events: list[str] = []
        self.writer_pids: set[int] = set()
        write = checkpoint_writer.write_buckets

        def held_write(transforms, after, rank, buckets, results_queue):
            held = threading.current_thread().name == "checkpoint-writer" and self.name in str(buckets[0][0])
            if held:
                self.events.append("writing")
                self.writer_pids.add(os.getpid())
                self.writing.set()
                assert self.release.wait(self.limit), "the test never released the writer"
            write(transforms, after, rank, buckets, results_queue)
            if held:
                self.events.append("written")
                self.done.set()

        monkeypatch.setattr(checkpoint_writer, "write_buckets", held_write)


@pytest.mark.parametrize("optimizer", ["distributed", "plain"])
def test_an_async_checkpoint_holds_the_state_it_was_taken_at_while_training_changes_it(
        tmp_path, megatron_world, monkeypatch, optimizer):
    """The writer is held until an optimizer step has changed weights, Adam state and EMA in
    place: the checkpoint it then completes holds, bit for bit, the copy taken at the save."""
    cfg, training, state = _training(f"optim.distributed_optimizer={optimizer == 'distributed'}")
    held = _HeldWriter(monkeypatch)
    checkpointer = Checkpointer(tmp_path, async_save=True)
    at_save = _copy_of(training)
    checkpointer.save(1, state, cfg.to_dict())
    assert held.writing.wait(60) and not held.done.is_set()
    _optimizer_step(training, seed=1)  # training goes on while the writer is held
    moved_on = _copy_of(training)
    for part in ("model.", "ema.", "optimizer."):
        assert any(not torch.equal(v, at_save[k]) for k, v in moved_on.items() if k.startswith(part)), part
    checkpointer.poll()
    assert latest_checkpoint(tmp_path) is None  # still being written
    held.release.set()
    checkpointer.close()
    assert held.writer_pids == {os.getpid()}  # a thread of this process: nothing was forked
    _, fresh, fresh_state = _training(f"optim.distributed_optimizer={optimizer == 'distributed'}")
    load_checkpoint(latest_checkpoint(tmp_path), fresh_state)
    loaded = _copy_of(fresh)
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_a_save_waits_for_the_writer_before_it_and_reuses_its_snapshot(tmp_path, megatron_world, monkeypatch):
    """No two snapshots: the second save waits until the first one's writer is done, then copies
    into the same buffers. The snapshot is what the rank writes, each tensor once."""
    from goku_megatron.checkpoint.writer import Snapshot

    cfg, training, state = _training()
    held = _HeldWriter(monkeypatch, name="iter_0000001")
    snapshots: list[set[int]] = []
    take = Snapshot.take

    def recorded_take(self, sharded):
        held.events.append("snapshot")
        out = take(self, sharded)
        snapshots.append({t.data_ptr() for t in self._buffers.values()})
        return out

    monkeypatch.setattr(Snapshot, "take", recorded_take)
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(1, state, cfg.to_dict())
    assert held.writing.wait(60)
    _optimizer_step(training, seed=1)
    threading.Timer(1.0, held.release.set).start()
    blocked = checkpointer.save(2, state, cfg.to_dict())
    assert blocked >= 1.0 and held.events[:4] == ["snapshot", "writing", "written", "snapshot"]
    assert snapshots[0] == snapshots[1]  # the same buffers
    # What the snapshot holds: weights, EMA, Adam moments, once each (the fp32 main weights are
    # the weights themselves with the distributed optimizer in fp32: copied once)
    adam = sum(v.nbytes for k, v in _optimizer_tensors(training).items() if k.endswith(("exp_avg", "exp_avg_sq")))
    weights = sum(p.nbytes for p in training.model[0].parameters())
    assert checkpointer.snapshot_bytes == 2 * weights + adam
    checkpointer.close()
    assert checkpointer.snapshot_bytes == 0
    assert [p.name for p in _complete(tmp_path)] == ["iter_0000002", "iter_0000001"]


def test_a_save_whose_structure_changed_is_planned_afresh(tmp_path, megatron_world):
    """Saves of an unchanged structure reuse the previous plan and skip megatron's sharding
    check (Checkpointer._planning); a save that holds more (here the EMA and the optimizer, after
    three saves of the weights alone) is checked and planned again, so nothing is left out."""
    cfg, training, state = _training()
    checkpointer = Checkpointer(tmp_path, async_save=True)
    for step in (1, 2, 3):
        checkpointer.save(step, TrainingState(training.model), cfg.to_dict())
    checkpointer.save(4, state, cfg.to_dict())
    checkpointer.close()
    weights_only = checkpoint_tensors(checkpoint_dir(tmp_path, 3))
    everything = checkpoint_tensors(checkpoint_dir(tmp_path, 4))
    assert all(k.startswith("model.") for k in weights_only)
    assert {k.split(".")[0] for k in everything} == {"model", "ema", "optimizer"}
    saved = _copy_of(training)
    _, fresh, fresh_state = _training()
    load_checkpoint(checkpoint_dir(tmp_path, 4), fresh_state)
    assert all(torch.equal(v, saved[k]) for k, v in _copy_of(fresh).items())


def _complete(run_dir: Path) -> list[Path]:
    return sorted((p for p in (run_dir / "checkpoints").glob("iter_*") if p.is_dir()), reverse=True)


def test_a_failed_write_ends_in_one_line_and_publishes_nothing(tmp_path, megatron_world, monkeypatch):
    from goku_megatron.checkpoint import writer as checkpoint_writer

    cfg, training, state = _training()
    write = checkpoint_writer.write_buckets

    def vanished_directory(transforms, after, rank, buckets, results_queue):
        shutil.rmtree(Path(buckets[0][0]).parent)  # e.g. a cleanup job or a lost mount
        write(transforms, after, rank, buckets, results_queue)

    monkeypatch.setattr(checkpoint_writer, "write_buckets", vanished_directory)
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(1, state, cfg.to_dict())
    with pytest.raises(ConfigError) as err:
        checkpointer.wait()
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("checkpoint iter_0000001: writing failed (") and "No such file" in str(err.value)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ConfigError, match="checkpoint iter_0000002: writing failed"):  # a sync save, too
        checkpointer.save(2, state, cfg.to_dict(), blocking=True)
    monkeypatch.setattr(checkpoint_writer, "write_buckets", write)
    checkpointer.save(3, state, cfg.to_dict())  # the next save works
    checkpointer.close()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 3)


def _full_disk(monkeypatch, free: int) -> None:
    """The run directory's file system reports ``free`` bytes free (shutil.disk_usage)."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


FULL_DISK_ERRORS = {  # where a full disk shows: a writer's OSError, or torch.save's zip writer without errno
    "writer_enospc": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "writer_zip": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "loader_state_enospc": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # in the training thread
}


@pytest.mark.parametrize("where", FULL_DISK_ERRORS)
def test_a_full_disk_is_named_with_the_space_needed_and_free(tmp_path, megatron_world, monkeypatch, caplog, where):
    """A save that runs out of space says so in one line, with what a checkpoint needs (the last
    one's size) and what is free; its partial directory is gone and latest stays. The space is
    checked before each save: one warning for the run."""
    from goku_megatron.checkpoint import read_manifest
    from goku_megatron.checkpoint import save as checkpoint_save
    from goku_megatron.checkpoint import writer as checkpoint_writer
    from goku_megatron.checkpoint.save import _size

    cfg, training, state = _training()
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(1, state, cfg.to_dict(), loader_state={})
    checkpointer.wait()
    needed = sum(f["size"] for f in read_manifest(checkpoint_dir(tmp_path, 1))["files"].values())
    _full_disk(monkeypatch, free=4096)

    def fails(*args, **kwargs):
        raise FULL_DISK_ERRORS[where]

    monkeypatch.setattr(*((checkpoint_save, "write_atomically") if where.startswith("loader") else
                          (checkpoint_writer, "write_buckets")), fails)
    says = (f"the disk is full: a checkpoint needs about {_size(needed)}, {tmp_path / 'checkpoints'} has "
            "4.1 kB free; the partial save was removed and the newest complete checkpoint stays latest")
    for step, blocking in ((2, False), (3, True)):
        with caplog.at_level(logging.WARNING, "goku_megatron.checkpoint"), pytest.raises(ConfigError) as err:
            checkpointer.save(step, state, cfg.to_dict(), loader_state={}, blocking=blocking)
            checkpointer.wait()
        assert "\n" not in str(err.value) and str(err.value).startswith(f"checkpoint iter_000000{step}: {says}")
        assert not checkpoint_dir(tmp_path, step).with_name(f"iter_000000{step}.partial").exists()
        assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)
    warnings = [r.getMessage() for r in caplog.records if "will likely fail" in r.getMessage()]
    assert warnings == [f"checkpoint iter_0000002: {tmp_path / 'checkpoints'} has 4.1 kB free, a checkpoint takes "
                        f"about {_size(needed)}: this save will likely fail; free space there"]
    monkeypatch.undo()  # space again
    checkpointer.save(4, state, cfg.to_dict())
    checkpointer.close()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)


def test_a_failed_write_with_space_left_is_no_full_disk(tmp_path, megatron_world, monkeypatch):
    """torch.save's zip writer fails without an errno; with room for a checkpoint that is not a
    full disk, and the line says what failed."""
    from goku_megatron.checkpoint import writer as checkpoint_writer

    cfg, training, state = _training()

    def fails(*args, **kwargs):
        raise FULL_DISK_ERRORS["writer_zip"]

    monkeypatch.setattr(checkpoint_writer, "write_buckets", fails)
    with pytest.raises(ConfigError) as err:
        Checkpointer(tmp_path).save(1, state, cfg.to_dict(), blocking=True)
    assert str(err.value).startswith("checkpoint iter_0000001: writing failed (RuntimeError: [enforce fail at "
                                     "inline_container.cc:672] . unexpected pos 704 vs 598); the partial save was "
                                     "removed")
    assert not (tmp_path / "checkpoints" / "iter_0000001.partial").exists()


def test_a_writer_that_does_not_finish_is_given_up_in_one_line(tmp_path, megatron_world, monkeypatch):
    cfg, training, state = _training()
    held = _HeldWriter(monkeypatch)
    checkpointer = Checkpointer(tmp_path, async_save=True, write_timeout_s=0.5)
    checkpointer.save(1, state, cfg.to_dict())
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^checkpoint iter_0000001: the background writer is still writing "
                                          r"after 0.5 s \(a stalled disk\?\)"):
        checkpointer.wait()
    assert time.monotonic() - start < 30 and latest_checkpoint(tmp_path) is None
    held.release.set()  # the disk recovers: the save completes after all
    assert held.done.wait(60)
    checkpointer.close()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def test_training_steps_run_while_the_writer_writes_and_the_checkpoint_is_their_start(
        reference, toy_data, tmp_path, monkeypatch):
    """goku-train's loop: step 3's async save is held in its writer until step 5's samples are
    drawn, so step 4 runs (and step 5 starts) while it writes. The checkpoint it completes holds
    step 3 exactly: every tensor, the loader state and the step equal a synchronous save of the
    state taken the moment the async one was, and the uninterrupted run's checkpoint 3; the run
    itself goes on to the uninterrupted run's losses and checkpoint 6."""
    run_dir, copy_dir = tmp_path / "run", tmp_path / "at-save"
    held = _HeldWriter(monkeypatch, name="iter_0000003")
    save = Checkpointer.save

    def save_with_a_copy(self, step, state, config, **kwargs):
        if step == 3 and not kwargs.get("blocking"):
            Checkpointer(copy_dir).save(step, state, config, blocking=True, train_state=kwargs.get("train_state"),
                                        loader_state=kwargs.get("loader_state"))
        return save(self, step, state, config, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save_with_a_copy)
    seen = {}

    def at_step_5(packs):
        seen.update(writing=held.writing.is_set() and not held.done.is_set(), latest=latest_checkpoint(run_dir))
        held.release.set()

    cfg = _cfg(toy_data, run_dir)
    _run(cfg, _Interfere(cfg, {5: at_step_5}))
    assert seen == {"writing": True, "latest": None}  # step 4 ran while checkpoint 3 was being written
    assert held.writer_pids == {os.getpid()}
    written, at_save = checkpoint_dir(run_dir, 3), checkpoint_dir(copy_dir, 3)
    assert_same_tensors(checkpoint_tensors(written), checkpoint_tensors(at_save))
    assert_same_tensors(checkpoint_tensors(written), checkpoint_tensors(checkpoint_dir(reference, 3)))
    assert load_loader_state(written, 0) == load_loader_state(at_save, 0) is not None
    assert adam_steps(written) == adam_steps(at_save) == [3.0] * len(adam_steps(written))
    assert losses(run_dir) == losses(reference)
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, 6)), checkpoint_tensors(checkpoint_dir(reference, 6)))
    assert "checkpoint_blocking_s" in metrics(run_dir)[2]


# ----------------------------------------------------------------------------------------------
# Validation on load


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(reference, toy_data, tmp_path, caplog, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    latest = run_dir / "checkpoints" / "iter_0000006"
    shard = sorted(latest.glob("*.distcp"))[0]
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    else:
        shard.unlink()
    assert validate_checkpoint(latest) is not None
    cfg = _cfg(toy_data, run_dir)
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        chosen = choose_resume_checkpoint(run_dir, cfg)
    assert chosen == run_dir / "checkpoints" / "iter_0000003"
    lines = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"checkpoint iter_0000006: {shard.name} ")
    assert lines[0].endswith(f"falling back to {chosen}")
    assert not latest.exists()  # moved aside, so keep_last never counts it


def _flip(path: Path, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of a file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["__0_0.distcp", ".metadata", "common.pt"])
def test_a_flipped_byte_moves_the_checkpoint_aside_and_the_resume_is_exact(reference, toy_data, tmp_path, caplog,
                                                                            target):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / "iter_0000006"
    _flip(newest / target)
    assert validate_checkpoint(newest) is None  # same sizes: only the checksums can tell
    cfg = _cfg(toy_data, run_dir, "train.steps=6")
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        chosen = choose_resume_checkpoint(run_dir, cfg)
    assert chosen == run_dir / "checkpoints" / "iter_0000003"
    (line,) = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert line.startswith(f"checkpoint iter_0000006: {target} does not match its checksum (corrupt), moved to "
                           "iter_0000006.invalid-")
    assert line.endswith(f"falling back to {chosen}")
    assert latest_checkpoint(run_dir) == chosen  # the pointer follows
    _run(cfg)  # resumes from step 3 by itself
    _same_run(run_dir, reference)


def test_a_named_checkpoint_that_fails_its_checksums_is_refused_in_one_line(reference, toy_data, tmp_path):
    broken = tmp_path / "iter_0000003"
    shutil.copytree(reference / "checkpoints" / "iter_0000003", broken)
    _flip(broken / "__0_1.distcp")
    cfg = _cfg(toy_data, tmp_path / "new", f"checkpoint.resume={broken}")
    with pytest.raises(ConfigError, match=r"^checkpoint.resume=.*iter_0000003: __0_1.distcp does not match its "
                                          r"checksum \(corrupt\); pass a sound checkpoint$"):
        choose_resume_checkpoint(tmp_path / "new", cfg)
    assert broken.is_dir()  # not ours to move


def test_resume_refuses_a_checkpoint_of_another_model(reference, toy_data, tmp_path):
    cfg = _cfg(toy_data, tmp_path / "new", "model.hidden_size=96",
               f"checkpoint.resume={reference / 'checkpoints' / 'iter_0000003'}")
    with pytest.raises(ConfigError) as err:
        choose_resume_checkpoint(tmp_path / "new", cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "saved for another model: model.hidden_size 64 (checkpoint) vs 96 (this run)" in message


def test_resume_from_an_incomplete_checkpoint_fails_in_one_line(reference, toy_data, tmp_path):
    broken = tmp_path / "iter_0000003"
    shutil.copytree(reference / "checkpoints" / "iter_0000003", broken)
    (broken / "common.pt").unlink()
    cfg = _cfg(toy_data, tmp_path / "new", f"checkpoint.resume={broken}")
    with pytest.raises(ConfigError, match=r"^checkpoint.resume=.*iter_0000003: common.pt is missing; "):
        choose_resume_checkpoint(tmp_path / "new", cfg)


# ----------------------------------------------------------------------------------------------
# Exact resume


def _same_run(run_dir: Path, reference: Path, steps=range(4, 7)) -> None:
    got, want = losses(run_dir), losses(reference)
    assert [got[s] for s in steps] == [want[s] for s in steps]
    assert_same_tensors(checkpoint_tensors(latest_checkpoint(run_dir)),
                        checkpoint_tensors(latest_checkpoint(reference)))


def test_inline_data_trains_bitwise_as_read_ahead(reference, toy_data, tmp_path):
    """data.workers=0 (everything on the training thread) against the reference's 2 read-ahead
    threads: the same losses, checkpoints and loader states, step by step."""
    run_dir = tmp_path / "run"
    _run(_cfg(toy_data, run_dir, "data.workers=0"))
    _same_run(run_dir, reference, steps=range(1, 7))
    for step in (3, 6):
        assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, step)),
                            checkpoint_tensors(checkpoint_dir(reference, step)))
        assert load_loader_state(checkpoint_dir(run_dir, step), 0) == \
            load_loader_state(checkpoint_dir(reference, step), 0)


def test_resume_from_step_3_equals_the_uninterrupted_run(reference, toy_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, f"checkpoint.resume={reference / 'checkpoints' / 'iter_0000003'}")
    results = _run(cfg)
    assert len(results) == 3
    assert [r["step"] for r in metrics(run_dir)] == [4, 5, 6]
    _same_run(run_dir, reference)


def test_sigterm_saves_the_step_and_the_resume_is_exact(reference, toy_data, tmp_path, monkeypatch):
    from goku_megatron import train

    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, "train.save_interval=0")
    real_step, steps_run = train.train_step, []

    def signalled_at_4(*args):  # the signal lands while step 4 runs: step 4 completes, then the stop
        steps_run.append(len(steps_run) + 1)
        if steps_run[-1] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)
    monkeypatch.setattr(train, "train_step", signalled_at_4)
    with pytest.raises(Preempted) as stop:
        _run(cfg)
    assert stop.value.step == 4 and stop.value.signum == signal.SIGTERM
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert latest_checkpoint(run_dir).name == "iter_0000004"
    _run(cfg)  # auto-resume: the run dir's own checkpoint
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    _same_run(run_dir, reference, steps=range(1, 7))


class _StallAt(_Interfere):
    """The run's own data source, whose samples at step ``step`` never come: each draw is a bad
    sample, and the first one brings a SIGTERM."""

    def __init__(self, cfg, step):
        super().__init__(cfg, {})
        self.step = step

    def next_step(self, step):
        if step != self.step:
            return self.source.next_step(step)
        real, signalled = self.source.prepare, []

        def stall(raw, stage):
            if not signalled:
                signalled.append(os.kill(os.getpid(), signal.SIGTERM))
            return None
        self.source.prepare = stall
        try:
            return self.source.next_step(step)
        finally:
            self.source.prepare = real


def test_sigterm_between_steps_saves_the_last_step_with_its_data_unread(reference, toy_data, tmp_path):
    """The signal lands once step 4's samples are drawn, before it runs: step 3 is saved with the
    loader state before those samples, and the resumed run draws them again."""
    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, "train.save_interval=0")
    with pytest.raises(Preempted) as stop:
        _run(cfg, _Interfere(cfg, {4: lambda packs: os.kill(os.getpid(), signal.SIGTERM)}))
    assert stop.value.step == 3
    assert load_loader_state(latest_checkpoint(run_dir), 0) == load_loader_state(checkpoint_dir(reference, 3), 0)
    _run(cfg)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    _same_run(run_dir, reference, steps=range(1, 7))


def test_sigterm_during_a_data_wait_saves_the_last_step_and_the_resume_is_exact(reference, toy_data, tmp_path):
    """Inline data (_StallAt patches the draws of the training thread's source)."""
    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, "train.save_interval=0", "data.cache_mb=0", "data.workers=0")
    with pytest.raises(Preempted) as stop:
        _run(cfg, _StallAt(cfg, 4))
    assert stop.value.step == 3 and stop.value.signum == signal.SIGTERM
    assert latest_checkpoint(run_dir).name == "iter_0000003"
    _run(cfg)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    _same_run(run_dir, reference, steps=range(1, 7))


def test_a_shard_deleted_mid_run_is_skipped_and_the_run_goes_on(tmp_path, megatron_world):
    """The toy run read without its cache, one of its four shards deleted after step 2's samples
    were drawn: the run trains to the end and counts the shard's samples it skipped."""
    from goku_megatron.data.toy import make_toy_dataset

    data = tmp_path / "toy"
    base = load_config("toy", TOY_CHECKPOINT_RUN).data
    shards = make_toy_dataset(data, clips=base.toy_clips, images=0, size=base.toy_size, frames=base.toy_frames,
                              shard_size=8)
    cfg = _cfg(data, tmp_path / "run", "data.cache_mb=0", "data.workers=0", "data.create_if_missing=false",
               "train.save_interval=0")
    results = _run(cfg, _Interfere(cfg, {2: lambda packs: shards[1].unlink()}))
    assert len(results) == 6 and all(math.isfinite(r.loss) for r in results)
    rows = metrics(tmp_path / "run")
    assert rows[1]["bad/unreadable_shard"] == 0 and rows[-1]["bad/unreadable_shard"] > 0


# ----------------------------------------------------------------------------------------------
# Non-finite steps


def test_a_nan_step_is_skipped_and_counted(reference, toy_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, "train.save_interval=0")
    results = _run(cfg, _Interfere(cfg, {2: _nan}))
    assert [r.skipped for r in results] == [False, True, False, False, False, False]
    rows = metrics(run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1, 1]
    assert rows[1]["loss"] != rows[1]["loss"]  # NaN, logged as such
    assert rows[0]["loss"] == losses(reference)[1]
    # the skipped step changed neither the weights nor Adam: 5 updates in 6 steps
    assert adam_steps(latest_checkpoint(run_dir)) == [5.0] * len(adam_steps(latest_checkpoint(run_dir)))
    weights = checkpoint_tensors(latest_checkpoint(run_dir))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_too_many_bad_steps_in_a_row_stop_the_run(reference, toy_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(toy_data, run_dir, "checkpoint.max_bad_steps=2", "train.save_interval=1")
    with pytest.raises(Diverged) as err:
        _run(cfg, _Interfere(cfg, {3: _nan, 4: _nan}))
    assert str(err.value).startswith("steps 3..4: 2 steps in a row had a non-finite loss or gradient norm")
    assert str(err.value).endswith(f"A restart resumes from {run_dir / 'checkpoints' / 'iter_0000003'}: "
                                   "check that it is sound first")
    assert "\n" not in str(err.value)
    # step 3 was skipped and saved, step 4 stopped the run: the weights are those after step 2
    assert latest_checkpoint(run_dir).name == "iter_0000003"
    assert adam_steps(latest_checkpoint(run_dir)) == [2.0] * len(adam_steps(latest_checkpoint(run_dir)))


# ----------------------------------------------------------------------------------------------
# The packed (latent) loader resumes exactly too


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    from tiny_models import write_latent_shards

    return write_latent_shards(tmp_path_factory.mktemp("latents"), [(1, 4, 4), (3, 4, 4), (2, 6, 4)], count=24,
                               samples_per_shard=8)


def test_packed_loader_resume_is_exact(latent_shards, tmp_path, megatron_world):
    def cfg(run_dir, *extra):
        c = load_config(None, ["data.kind=latent", f"data.path={latent_shards}", "model.in_channels=4",
                               "train.micro_batch_size=1", "train.global_batch_size=2", "train.steps=4",
                               "train.log_interval=1", "train.save_interval=2", "optim.warmup_steps=0",
                               "data.stages=[{steps: 2, token_budget: 24}, {steps: 2, token_budget: 32}]",
                               f"train.run_dir={run_dir}", *extra])
        validate(c, 1)
        return c

    reference = tmp_path / "reference"
    _run(cfg(reference))
    resumed = tmp_path / "resumed"
    assert len(_run(cfg(resumed, f"checkpoint.resume={checkpoint_dir(reference, 2)}"))) == 2
    assert losses(resumed) == {s: v for s, v in losses(reference).items() if s > 2}
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(resumed, 4)),
                        checkpoint_tensors(checkpoint_dir(reference, 4)))
