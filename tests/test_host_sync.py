"""A training step's forward and backward make the host wait for the device nowhere: everything the
kernels need on the host (segment lengths, CP shard bounds, caption token positions) comes with the
pack, computed when it was built (goku_megatron/op_trace.py says which ops wait and why).

The step runs as goku-train runs it (train.train_step, megatron's schedule, the loss) on packs of
differently sized samples with padding and on a pack of equal clips, at TP=1 and at CP=2 over gloo
(torchrun; this file doubles as the worker). On CPU nothing waits, but the ops that would on a
GPU are the same ops, so OpTrace finds them here; on a GPU machine the worker runs on CUDA and
also catches copies to the host and pageable copies to the device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun

from goku_megatron.op_trace import OpTrace


def test_op_trace_names_the_ops_that_wait_for_the_device():
    """The checker itself: each way of reading device values on the host is caught, and the
    sync-free spelling of the same work is not."""
    x = torch.arange(6.0)
    lengths = torch.tensor([2, 4])
    with OpTrace() as trace:
        x.sum().item()
        x[x > 2]
        torch.repeat_interleave(torch.arange(2), lengths)
        torch.unique_consecutive(lengths)
        lengths.tolist()
    assert [line.split(":")[0] for line in trace.syncs] == [
        "aten._local_scalar_dense.default", "aten.index.Tensor", "aten.repeat_interleave.Tensor",
        "aten.unique_consecutive.default", "Tensor.tolist"]
    with OpTrace() as trace:
        x[torch.tensor([0, 3])]
        torch.repeat_interleave(torch.arange(2), lengths, output_size=6)
        x.split([2, 4])
    assert not trace.syncs and trace.total > 3
    assert torch.Tensor.tolist(lengths) == [2, 4]  # put back on exit


def _worker(out_dir: Path) -> None:
    """One training step of the tiny model on a mixed pack with padding and a pack of equal
    clips; megatron's forward-backward runs under OpTrace. Rank 0 saves what it found."""
    from megatron.core import parallel_state

    import goku_megatron.train as train
    from goku_megatron import cpu_compat
    from goku_megatron.batch import PackSample, build_pack, pack_batch
    from goku_megatron.config import load_config, validate
    from goku_megatron.platform import choose_backends, world_size_from_env

    cpu_compat.apply()
    world = world_size_from_env()
    cfg = load_config(None, ["model.preset=tiny", "model.zero_init=false", "model.in_channels=3",
                             "train.global_batch_size=2", "train.micro_batch_size=1", f"parallel.cp={world}",
                             "optim.warmup_steps=0"])
    validate(cfg, world)
    backends = choose_backends(cfg)
    training = train.setup(cfg, backends)
    g = torch.Generator().manual_seed(0)
    text_dim = cfg.model.text_dim

    def sample(shape: tuple[int, int, int], words: int) -> PackSample:
        return PackSample(noisy=torch.randn(3, *shape, generator=g), target=torch.randn(3, *shape, generator=g),
                          timestep=float(torch.rand((), generator=g)), text=torch.randn(8, text_dim, generator=g),
                          text_mask=torch.arange(8) < words)

    # 12, 6 and 3 tokens and 3 of padding: a CP=2 share boundary falls inside the second sample
    mixed = build_pack([sample((2, 4, 6), 5), sample((1, 6, 4), 3), sample((3, 2, 2), 8)], 24, (1, 2, 2))
    equal = pack_batch(torch.randn(2, 3, 2, 4, 6, generator=g), torch.rand(2, generator=g),
                       torch.randn(2, 8, text_dim, generator=g), torch.arange(8)[None] < torch.tensor([[2], [7]]),
                       (1, 2, 2), target=torch.randn(2, 3, 2, 4, 6, generator=g))
    traces: list[OpTrace] = []
    schedule = train.get_forward_backward_func

    def traced_schedule():
        forward_backward = schedule()

        def run(**kwargs):
            with OpTrace() as trace:
                result = forward_backward(**kwargs)
            traces.append(trace)
            return result

        return run

    train.get_forward_backward_func = traced_schedule
    packs = [p.to(backends.torch_device()) for p in (mixed, equal)]  # as train.run moves them
    result = train.train_step(packs, training.model, training.optimizer, training.scheduler)
    if torch.distributed.get_rank() == 0:
        torch.save({"syncs": [s for t in traces for s in t.syncs], "ops": sum(t.total for t in traces),
                    "loss": result.loss, "cp": parallel_state.get_context_parallel_world_size()},
                   out_dir / "trace.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("cp", [1, 2])
def test_training_step_never_waits_for_the_device(tmp_path, cp):
    run_torchrun(cp, [__file__, str(tmp_path)])
    found = torch.load(tmp_path / "trace.pt")
    assert found["cp"] == cp and found["ops"] > 1000 and torch.isfinite(torch.tensor(found["loss"]))
    assert found["syncs"] == [], "\n".join(found["syncs"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
