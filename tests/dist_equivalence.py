"""torchrun worker for test_parallel_equivalence.py: two optimizer steps of the tiny Goku model.

Usage: torchrun --nproc-per-node N tests/dist_equivalence.py OUT_DIR [--packed] key=value ...
Every layout trains on the same synthetic global batches (each DP rank takes its slice; CP peers
take the same one), and dumps the loss, grad norm, full (TP-gathered) gradients of the parameters
that train (in a LoRA run the adapters) and final weights under global parameter names, then saves
a distributed checkpoint (OUT_DIR/checkpoints) and the resolved config (OUT_DIR/config.yaml). By
default the batches are [3, 2, 8, 8] clips, packed micro_batch_size equal clips to a pack by the
data pipeline's own noised_pack, as a toy run packs them; ``--packed`` trains on packs of
differently sized samples instead (one pack per micro-batch), whose sample boundaries fall inside
and on the edges of context-parallel shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from torch.distributed.tensor import DTensor


CLIP_SHAPE = (3, 2, 8, 8)


def global_clips(step: int, size: int) -> list:
    """``size`` (key, Prepared) clips of CLIP_SHAPE, the same for every layout."""
    from goku_megatron.data.pipeline import Prepared

    gen = torch.Generator().manual_seed(1000 + step)
    words = ["red square moving left", "blue circle moving up", "a green square", "yellow circle moving down"]
    pixels = torch.rand((size, *CLIP_SHAPE), generator=gen) * 2 - 1
    return [(f"{step}-{i}", Prepared(pixels[i], words[(step + i) % len(words)])) for i in range(size)]


# (T, H, W) of the samples of a pack with patch 1x2x2: 12, 6 and 3 tokens (21 of a 24-token budget).
PACK_SHAPES = [(2, 4, 6), (1, 6, 4), (3, 2, 2)]
PACK_BUDGET = 24


def global_packs(step: int, size: int, encoder) -> list:
    """``size`` packs; pack p rotates PACK_SHAPES by p, so sample boundaries move from pack to pack."""
    from goku_megatron.batch import PackSample, build_pack

    words = ["red square moving left", "a blue circle", "green square moving up and down"]
    packs = []
    for p in range(size):
        gen = torch.Generator().manual_seed(2000 + 10 * step + p)
        shapes = PACK_SHAPES[p % 3:] + PACK_SHAPES[:p % 3]
        text, mask = encoder([words[(p + i) % 3] for i in range(len(shapes))])
        samples = [PackSample(noisy=torch.randn(3, *shape, generator=gen), target=torch.randn(3, *shape, generator=gen),
                              timestep=float(torch.rand((), generator=gen)), text=text[i], text_mask=mask[i],
                              key=f"{step}-{p}-{i}")
                   for i, shape in enumerate(shapes)]
        packs.append(build_pack(samples, PACK_BUDGET, (1, 2, 2)))
    return packs


def full_tensors(stage, use_grad: bool) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in stage.named_parameters():
        if use_grad and not param.requires_grad:  # frozen (a LoRA run's base): no gradient
            continue
        value = (getattr(param, "main_grad", param.grad) if use_grad else param.data).detach()
        if isinstance(value, DTensor):  # parallel.fsdp: gather the shards over the DP x CP ranks
            value = value.full_tensor()
        value = value.clone()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            torch.distributed.all_gather(parts, value, group=tp_group)
            value = torch.cat(parts, dim=param.partition_dim)
        out[stage.global_name(name)] = value
    return out


def main() -> None:
    from goku_megatron import cpu_compat
    from goku_megatron.checkpoint import base_of, gather_weights, save_checkpoint
    from goku_megatron.config import load_config, validate
    from goku_megatron.model.goku import iter_stage_models
    from goku_megatron.platform import local_device, world_size_from_env
    from goku_megatron.batch import num_tokens
    from goku_megatron.data.pipeline import noised_pack
    from goku_megatron.data.text_encoder import HashTextEncoder
    from goku_megatron.train import setup, train_step
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    out_dir = Path(sys.argv[1])
    packed = "--packed" in sys.argv[2:]
    overrides = [a for a in sys.argv[2:] if a != "--packed"]
    batches = ["train.global_batch_size=4", "train.micro_batch_size=1"] if packed else \
        ["train.global_batch_size=8", "train.micro_batch_size=2"]
    cpu_compat.apply()
    cfg = load_config(None, ["model.preset=tiny", "model.zero_init=false", "model.in_channels=3", *batches,
                             "optim.warmup_steps=0", "optim.lr=1e-3", "optim.clip_grad=0.5", *overrides])
    validate(cfg, world_size_from_env())
    training = setup(cfg)
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    (stage,) = list(iter_stage_models(model))
    reduced: dict[str, torch.Tensor] = {}

    # The gradients are taken once reduced, before the optimizer clips them. The distributed
    # optimizer reduce-scatters (each DP x CP rank holds only its shard's sums) and clips its shard
    # in place: all-reduce instead, so every rank holds the whole reduced gradient; the optimizer's
    # shard receives the same sums either way.
    def finalize_and_record(*args, force_all_reduce: bool = False, **kwargs) -> None:
        finalize_model_grads(*args, force_all_reduce=True, **kwargs)
        reduced.update(full_tensors(stage, use_grad=True))

    model[0].config.finalize_model_grads_func = finalize_and_record
    # With optim.overlap_grad_reduce the backward pass itself starts each bucket's reduction: make
    # that an all-reduce too.
    model[0].force_all_reduce = True
    encoder = HashTextEncoder(dim=cfg.model.text_dim, max_tokens=8)

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    g = cfg.train.global_batch_size
    local = g // dp
    dump_rank = (parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
                 and parallel_state.get_context_parallel_rank() == 0)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    record: dict = {"loss": [], "grad_norm": []}
    for step in (1, 2):
        if packed:
            packs = global_packs(step, g, encoder)[dp_rank * local:(dp_rank + 1) * local]
        else:
            mine = global_clips(step, g)[dp_rank * local:(dp_rank + 1) * local]
            mbs = cfg.train.micro_batch_size
            budget = mbs * num_tokens(CLIP_SHAPE, cfg.model.patch_size)
            packs = [noised_pack(mine[i:i + mbs], step, budget, cfg, encoder) for i in range(0, local, mbs)]
        # On a GPU (tests/test_gpu.py) the packs go where the model is, as goku-train's loader sends them.
        result = train_step([p.to(local_device()) for p in packs], model, optimizer, scheduler)
        record["loss"].append(result.loss)
        record["grad_norm"].append(result.grad_norm)
        if dump_rank:
            torch.save(reduced, out_dir / f"grads{step}_pp{pp_rank}.pt")
    gather_weights(model)  # optim.overlap_param_gather leaves the gather to the next forward
    weights = full_tensors(stage, use_grad=False)
    if dump_rank:
        torch.save(weights, out_dir / f"weights_pp{pp_rank}.pt")
    save_checkpoint(out_dir, 2, model, cfg.to_dict(), base=base_of(cfg) if cfg.lora.rank else None)
    if torch.distributed.get_rank() == 0:
        torch.save(record, out_dir / "record.pt")
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
