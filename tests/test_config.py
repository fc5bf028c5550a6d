"""Config loading, validation and ``goku-train --dry-run``: fast, one process, no process groups."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from goku_megatron.config import (
    MODEL_PRESETS,
    RECIPES_DIR,
    Config,
    ConfigError,
    available_recipes,
    config_from_dict,
    load_config,
    parse_overrides,
    validate,
)
from goku_megatron.planner import resolve_layout


@pytest.fixture(autouse=True)
def _cpu_single_process(monkeypatch):
    """Plan as a CPU box outside torchrun, whatever runs the tests, so the dry-run text is fixed."""
    import goku_megatron.cli.train
    import goku_megatron.platform

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(goku_megatron.platform, "has_cuda", lambda: False)
    monkeypatch.setattr(goku_megatron.cli.train, "has_cuda", lambda: False)


def _error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"ConfigError message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------------------------
# Validation: one case per rule in validate()

# (overrides, world_size, has_cuda, field named in the message, regex of the rule's fix hint)
INVALID = [
    (["parallel.auto=true", "model.recompute_granularity=selective"], 8, True, "model.recompute_granularity",
     r"parallel.auto plans memory for full activation recompute, not .*=selective; set it to full"),
    # model shape: positive sizes
    (["model.num_layers=0"], 1, False, "model.num_layers", r"must be positive, got 0"),
    (["model.hidden_size=-64"], 1, False, "model.hidden_size", r"must be positive, got -64"),
    (["model.ffn_hidden_size=0"], 1, False, "model.ffn_hidden_size", r"must be positive, got 0"),
    (["model.num_heads=0"], 1, False, "model.num_heads", r"must be positive, got 0"),
    (["model.in_channels=0"], 1, False, "model.in_channels", r"must be positive, got 0"),
    (["model.text_dim=-1"], 1, False, "model.text_dim", r"must be positive, got -1"),
    # patch size
    (["model.patch_size=[2,2]"], 1, False, "model.patch_size", r"three positive ints \[t, h, w\]"),
    (["model.patch_size=[1,0,2]"], 1, False, "model.patch_size", r"three positive ints \[t, h, w\]"),
    # heads
    (["model.hidden_size=64", "model.num_heads=5"], 1, False, "model.num_heads",
     r"hidden_size=64 is not divisible by model.num_heads=5; choose heads that divide"),
    (["model.hidden_size=72", "model.num_heads=8"], 1, False, "model.num_heads",
     r"head_dim=9 .*must be even and >= 8 for 3D RoPE; change model.num_heads"),
    (["model.hidden_size=24", "model.num_heads=4"], 1, False, "model.num_heads",
     r"head_dim=6 .*must be even and >= 8 for 3D RoPE"),
    # backend enums and GPU-only backends
    (["model.attention_backend=xformers"], 1, False, "model.attention_backend",
     r"'xformers' is not one of auto, te, flash, sdpa"),
    (["model.linear_backend=apex"], 1, False, "model.linear_backend", r"'apex' is not one of auto, te, local"),
    (["model.attention_backend=te"], 1, False, "model.attention_backend",
     r"'te' needs a GPU; use auto or sdpa on CPU"),
    (["model.attention_backend=flash"], 1, False, "model.attention_backend",
     r"'flash' needs a GPU; use auto or sdpa on CPU"),
    (["model.linear_backend=te"], 1, False, "model.linear_backend", r"'te' needs a GPU; use auto or local on CPU"),
    # parallel layout
    (["parallel.tp=0"], 1, False, "parallel.tp", r"must be >= 1, got 0"),
    (["parallel.pp=-1"], 1, False, "parallel.pp", r"must be >= 1, got -1"),
    (["parallel.cp=0"], 1, False, "parallel.cp", r"must be >= 1, got 0"),
    # context parallelism: heads per TP rank split by Ulysses, sequences split into cp (TE: 2*cp) parts
    (["parallel.tp=2", "parallel.cp=4"], 8, False, "parallel.cp",
     r"splits the 2 heads per tensor-parallel rank .* choose a parallel.cp that divides 2, or "
     r"model.attention_backend=te on GPU"),
    (["model.hidden_size=96", "model.num_heads=6", "parallel.cp=4"], 4, False, "parallel.cp",
     r"splits the 6 heads per tensor-parallel rank \(model.num_heads=6 / parallel.tp=1\)"),
    (["data.toy_size=6", "data.toy_frames=1", "train.micro_batch_size=1", "train.global_batch_size=1",
      "parallel.cp=2"], 2, False, "data.toy_size", r"the toy pack \(train.micro_batch_size x tokens per clip .*\)=9 "
     r"does not split into cp=2 ranks"),
    (["data.toy_size=4", "data.toy_frames=1", "train.micro_batch_size=1", "train.global_batch_size=1",
      "parallel.cp=4"], 4, True, "data.toy_size",
     r"=4 does not split into 2\*cp=8 chunks for Transformer Engine's CP attention"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 100, token_budget: 1001}]",
      "parallel.cp=2"], 2, False, "data.stages[0].token_budget", r"=1001 does not split into cp=2 ranks .*"
     r"make it a multiple of 2"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 100, token_budget: 1002}]",
      "parallel.cp=2"], 2, True, "data.stages[0].token_budget", r"into 2\*cp=4 chunks .*make it a multiple of 4"),
    (["parallel.distributed_backend=mpi"], 1, False, "parallel.distributed_backend",
     r"'mpi' is not one of auto, nccl, gloo"),
    (["parallel.distributed_backend=nccl"], 1, False, "parallel.distributed_backend",
     r"'nccl' needs GPUs; use auto or gloo on CPU"),
    (["parallel.tp=2", "parallel.pp=2"], 6, False, "parallel.tp",
     r"world size 6 is not divisible by tp\*pp\*cp=4; launch a multiple of 4 processes"),
    (["parallel.tp=2", "parallel.dp=3"], 8, False, "parallel.dp",
     r"parallel.dp=3 but world size 8 / \(tp\*pp\*cp=2\) = 4; set parallel.dp=4 or 0 \(derived\)"),
    (["parallel.tp=3"], 3, False, "parallel.tp",
     r"model.num_heads=4 is not divisible by parallel.tp=3; choose a tp that divides the number of heads"),
    (["model.ffn_hidden_size=255", "parallel.tp=2"], 2, False, "model.ffn_hidden_size",
     r"ffn_hidden_size=255 is not divisible by parallel.tp=2"),
    (["model.num_layers=3", "parallel.pp=2"], 2, False, "parallel.pp",
     r"num_layers=3 is not divisible by parallel.pp=2; choose a pp that divides the number of layers"),
    # train
    (["train.steps=0"], 1, False, "train.steps", r"must be positive, got 0"),
    (["train.micro_batch_size=0"], 1, False, "train.micro_batch_size", r"must be positive, got 0"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, False, "train.global_batch_size",
     r"global_batch_size=6 is not divisible by micro_batch_size\*dp=4\*1; make it a multiple of 4"),
    (["train.global_batch_size=12", "train.micro_batch_size=4"], 2, False, "train.global_batch_size",
     r"micro_batch_size\*dp=4\*2; make it a multiple of 8"),
    (["train.precision=fp16"], 1, False, "train.precision", r"'fp16' is not one of auto, fp32, bf16"),
    (["train.log_interval=0"], 1, False, "train.log_interval", r"must be positive, got 0"),
    (["train.save_interval=-1"], 1, False, "train.save_interval", r"must be >= 0, got -1"),
    # optim
    (["optim.lr=0"], 1, False, "optim.lr", r"must be positive, got 0"),
    (["optim.lr=-1e-4"], 1, False, "optim.lr", r"must be positive"),
    (["optim.min_lr=-1e-6"], 1, False, "optim.min_lr", r"must be in \[0, optim.lr="),
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], 1, False, "optim.min_lr", r"min_lr=0.001 must be in \[0, optim.lr=0.0001\]"),
    (["optim.warmup_steps=-5"], 1, False, "optim.warmup_steps", r"must be >= 0, got -5"),
    (["optim.decay=linear"], 1, False, "optim.decay", r"'linear' is not one of cosine, constant"),
    (["optim.clip_grad=-1"], 1, False, "optim.clip_grad", r"must be >= 0 \(0 disables\)"),
    # flow
    (["flow.timestep_sampling=beta"], 1, False, "flow.timestep_sampling",
     r"'beta' is not one of uniform, logit_normal"),
    (["flow.logit_std=0"], 1, False, "flow.logit_std", r"must be positive, got 0"),
    (["flow.shift=-2"], 1, False, "flow.shift", r"must be positive, got -2"),
    (["flow.caption_dropout=1.0"], 1, False, "flow.caption_dropout", r"must be in \[0, 1\), got 1.0"),
    (["flow.caption_dropout=-0.1"], 1, False, "flow.caption_dropout", r"must be in \[0, 1\)"),
    # data
    (["parallel.cp_comm_type=ring"], 1, False, "parallel.cp_comm_type", r"'ring' is not one of p2p, a2a, a2a\+p2p"),
    (["data.kind=webdataset"], 1, False, "data.kind", r"'webdataset' is not one of toy, raw, latent"),
    (["data.text_encoder=clip"], 1, False, "data.text_encoder", r"'clip' is not one of hash, t5"),
    (["data.text_encoder=t5"], 1, False, "data.text_encoder_path", r"needs data.text_encoder_path"),
    (["data.decoder=ffmpeg"], 1, False, "data.decoder", r"'ffmpeg' is not one of auto, pyav, dali"),
    (["data.max_text_tokens=0"], 1, False, "data.max_text_tokens", r"must be positive"),
    (["data.kind=latent"], 1, False, "data.stages", r"trains in stages: list data.stages"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 60}]"], 1, False, "data.stages",
     r"steps add up to 60 but train.steps=100"),
    (["data.kind=latent", "data.stages=[{steps: 100}]"], 1, False, "train.micro_batch_size",
     r"one pack of .* tokens; set it to 1"),
    (["data.kind=raw", "train.micro_batch_size=1", "data.stages=[{steps: 100}]"], 1, False, "data.vae_path",
     r"needs data.vae_path"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 100, token_budget: 0}]"], 1, False,
     "data.stages[0].token_budget", r"must be positive"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 50}, {steps: 50, image_ratio: 2}]"],
     1, False, "data.stages[1].image_ratio", r"must be in \[0, 1\]"),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 100, fps: 0}]"], 1, False,
     "data.stages[0]", r"must be positive"),
    (["data.toy_size=15"], 1, False, "data.toy_size", r"toy_size=15 is not divisible by model.patch_size h/w=2/2"),
    (["model.patch_size=[1,2,4]", "data.toy_size=18"], 1, False, "data.toy_size",
     r"not divisible by model.patch_size h/w=2/4"),
    (["model.patch_size=[2,2,2]", "data.toy_frames=7", "data.image_ratio=0"], 1, False, "data.toy_frames",
     r"toy_frames=7 is not divisible by model.patch_size t=2"),
    (["data.image_ratio=1.5"], 1, False, "data.image_ratio", r"must be in \[0, 1\], got 1.5"),
    (["data.image_ratio=-0.5"], 1, False, "data.image_ratio", r"must be in \[0, 1\]"),
    (["data.toy_colors=[red,purple]"], 1, False, "data.toy_colors",
     r"purple is not a toy colour; choose from red, green, blue, yellow \(empty: all\)"),
    # recompute, FP8, communication overlap (docs/performance.md)
    (["model.recompute_granularity=layer"], 1, False, "model.recompute_granularity",
     r"'layer' is not one of full, selective"),
    (["model.fp8=e5m2"], 1, True, "model.fp8", r"'e5m2' is not one of '' \(off\), e4m3, hybrid"),
    (["model.fp8_recipe=nvfp4"], 1, True, "model.fp8_recipe", r"'nvfp4' is not one of delayed, tensorwise, "
     r"blockwise, mxfp8"),
    (["model.fp8_bf16_layers=-1"], 1, False, "model.fp8_bf16_layers", r"must be >= 0, got -1"),
    (["optim.ddp_bucket_size=-5"], 1, False, "optim.ddp_bucket_size", r"must be >= 0 \(0: megatron's default\)"),
    (["model.fp8=e4m3"], 1, False, "model.fp8", r"needs a GPU with Transformer Engine; set model.fp8='' on CPU"),
    (["model.fp8=hybrid", "model.linear_backend=local"], 1, True, "model.linear_backend",
     r"model.fp8=hybrid runs in Transformer Engine's linears; set model.linear_backend=te"),
    (["model.fp8=e4m3", "data.kind=latent", "train.micro_batch_size=1",
      "data.stages=[{steps: 100, token_budget: 1000}]"], 1, True, "data.stages[0].token_budget",
     r"=1000: FP8 GEMMs \(delayed\) need a multiple of 16 tokens .*make it a multiple of 16"),
    (["model.fp8=e4m3", "model.fp8_recipe=mxfp8", "data.kind=latent", "train.micro_batch_size=1",
      "data.stages=[{steps: 100, token_budget: 1008}]"], 1, True, "data.stages[0].token_budget",
     r"\(mxfp8\) need a multiple of 32 tokens per context-parallel rank"),
    (["model.fp8=e4m3", "parallel.cp=2", "data.kind=latent", "train.micro_batch_size=1",
      "data.stages=[{steps: 100, token_budget: 1008}]"], 2, True, "data.stages[0].token_budget",
     r"make it a multiple of 32"),
    (["model.fp8=e4m3", "data.toy_size=6", "data.toy_frames=1", "train.micro_batch_size=1"], 1, True, "data.toy_size",
     r"the toy pack .*=9: FP8 GEMMs \(delayed\) need a multiple of 16"),
    (["model.fp8_bf16_layers=1"], 1, True, "model.fp8_bf16_layers", r"keeps layers out of FP8 training; set model.fp8"),
    (["model.compile=true", "parallel.tp=2"], 2, False, "model.compile", r"torch.compile cannot trace; set parallel.tp=1"),
    (["model.fp8=e4m3", "model.fp8_bf16_layers=1"], 1, True, "model.fp8_bf16_layers",
     r"needs an FP8 context per layer, which the delayed recipe's amax reduction does not allow; "
     r"use model.fp8_recipe=tensorwise"),
    (["model.fp8=e4m3", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers=2"], 1, True, "model.fp8_bf16_layers",
     r"keeps 4 of the 4 layers \(first and last 2\) in bf16 and none in FP8; lower it"),
    (["model.num_layers=8", "parallel.pp=4", "model.fp8=e4m3", "model.fp8_recipe=blockwise",
      "model.fp8_bf16_layers=3"], 4, True, "model.fp8_bf16_layers",
     r"more than the 2 layers of one pipeline stage \(megatron's limit, parallel.pp=4\)"),
    (["optim.fp8_param_gather=true"], 1, True, "optim.fp8_param_gather", r"set model.fp8 \(e4m3 or hybrid\)"),
    (["optim.fp8_param_gather=true", "model.fp8=e4m3", "optim.distributed_optimizer=false"], 1, True,
     "optim.fp8_param_gather", r"set optim.distributed_optimizer=true or optim.fp8_param_gather=false"),
    (["optim.fp8_param_gather=true", "model.fp8=e4m3", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers=1"],
     1, True, "optim.fp8_param_gather", r"set model.fp8_bf16_layers=0 \(is 1\) or optim.fp8_param_gather=false"),
    (["optim.overlap_param_gather=true", "optim.distributed_optimizer=false", "checkpoint.ema_decay=0"], 1, False,
     "optim.overlap_param_gather", r"set optim.distributed_optimizer=true"),
    (["optim.overlap_param_gather=true"], 1, False, "optim.overlap_param_gather",
     r"the EMA reads them right after each step: set checkpoint.ema_decay=0"),
    # FSDP (docs/parallelism.md): what megatron's FSDP2 wrapper refuses
    (["parallel.fsdp=true", "optim.distributed_optimizer=false", "parallel.pp=2"], 2, False, "parallel.pp",
     r"parallel.fsdp=true does not work with pipeline parallelism .*set parallel.pp=1"),
    (["parallel.fsdp=true"], 2, False, "optim.distributed_optimizer",
     r"shards the optimizer state itself: set optim.distributed_optimizer=false"),
    (["parallel.fsdp=true", "optim.distributed_optimizer=false", "optim.overlap_grad_reduce=true"], 2, False,
     "optim.overlap_grad_reduce", r"during the backward pass already: set optim.overlap_grad_reduce=false"),
    (["parallel.fsdp=true", "optim.distributed_optimizer=false", "parallel.fsdp_shard_size=3",
      "train.global_batch_size=16"], 4, False, "parallel.fsdp_shard_size", r"does not divide the 4 DP x CP ranks"),
    (["parallel.fsdp_shard_size=2"], 2, False, "parallel.fsdp_shard_size", r"set parallel.fsdp=true"),
    (["parallel.fsdp=true", "optim.distributed_optimizer=false", "parallel.fsdp_shard_size=-1"], 2, False,
     "parallel.fsdp_shard_size", r"must be >= 0"),
    # Weights & Biases (README, "Watching a run")
    (["train.wandb_project=goku", "train.wandb_mode=cloud"], 1, False, "train.wandb_mode",
     r"'cloud' is not one of online, offline, disabled"),
    (["train.wandb_entity=my-team"], 1, False, "train.wandb_project",
     r"name a W&B run, but W&B is off: set train.wandb_project"),
    # LoRA finetuning (docs/recipes.md, "LoRA finetuning")
    (["lora.rank=-4"], 1, False, "lora.rank", r"must be >= 0 \(0: no LoRA, the whole model trains\), got -4"),
    (["lora.base=runs/goku-8b"], 1, False, "lora.base", r"LoRA is off: set lora.rank > 0 \(e.g. 16\), or lora.base=''"),
    (["lora.rank=8", "lora.base=seed", "lora.alpha=0"], 1, False, "lora.alpha", r"must be positive .*, got 0.0"),
    (["lora.rank=8", "lora.base=seed", "lora.dropout=1"], 1, False, "lora.dropout", r"must be in \[0, 1\), got 1.0"),
    (["lora.rank=8", "lora.base=seed", "lora.targets=[]"], 1, False, "lora.targets",
     r"is empty: name the layers to adapt, from self_attn.q, .*, adaln, final"),
    (["lora.rank=8", "lora.base=seed", "lora.targets=[self_attn.qkv]"], 1, False, "lora.targets",
     r"unknown target 'self_attn.qkv'; use names from self_attn.q, self_attn.k, .*, mlp.fc2, adaln, final"),
    (["lora.rank=8", "lora.base=seed", "lora.targets=[mlp.fc1,mlp.fc1]"], 1, False, "lora.targets",
     r"names 'mlp.fc1' twice; list it once"),
    (["lora.rank=8"], 1, False, "lora.base", r"trains adapters on a base model: set lora.base to its run directory"),
    (["lora.rank=8", "lora.base=runs/goku-8b", "checkpoint.init_from=runs/goku-8b-ft-t2v"], 1, False,
     "checkpoint.init_from", r"a LoRA run takes them from lora.base: set checkpoint.init_from=''"),
    (["lora.rank=8", "lora.base=seed", "lora.targets=[final]", "parallel.pp=2"], 2, False, "lora.targets",
     r"leaves the first 1 of parallel.pp=2 pipeline stages nothing to train: add a per-layer target"),
    (["lora.rank=8", "lora.base=seed", "model.fp8=e4m3", "optim.fp8_param_gather=true"], 1, True,
     "optim.fp8_param_gather", r"LoRA's base is frozen .*: set optim.fp8_param_gather=false"),
]


@pytest.mark.parametrize("overrides, world_size, cuda, field, hint", INVALID,
                         ids=[" ".join(case[0]) + f" @world={case[1]}" for case in INVALID])
def test_validate_rejects(overrides, world_size, cuda, field, hint):
    """What every command does (cli/train.py): the planner resolves parallel.auto, then validate."""
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=hint) as excinfo:
        resolve_layout(cfg, world_size)
        validate(cfg, world_size, has_cuda=cuda)
    assert field in _error(excinfo)


def test_defaults_are_valid():
    """So each failure above comes from its own overrides."""
    cfg = load_config(None, [])
    validate(cfg, 1)
    assert cfg.parallel.dp == 1


def test_valid_config_fills_dp():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=16"])
    assert cfg.parallel.dp == 0
    validate(cfg, 8)
    assert cfg.parallel.dp == 2


def test_explicit_matching_dp_is_accepted():
    cfg = load_config(None, ["parallel.tp=2", "parallel.dp=4", "train.global_batch_size=16"])
    validate(cfg, 8)
    assert cfg.parallel.dp == 4


@pytest.mark.parametrize("overrides, world_size, cuda", [
    (["parallel.cp=2"], 2, False),
    (["parallel.tp=2", "parallel.cp=2", "parallel.pp=2", "train.global_batch_size=4"], 8, False),
    # The same sequences split over cp ranks but not into TE's 2*cp chunks: fine without TE.
    (["data.toy_size=4", "parallel.cp=4"], 4, False),
    (["data.kind=latent", "train.micro_batch_size=1", "data.stages=[{steps: 100, token_budget: 1002}]",
      "parallel.cp=2"], 2, False),
    # TE's CP attention does not split heads: 6 heads pass at cp=4.
    (["model.hidden_size=96", "model.num_heads=6", "parallel.cp=4", "model.attention_backend=te"], 4, True),
])
def test_context_parallel_layouts_pass(overrides, world_size, cuda):
    cfg = load_config(None, overrides)
    validate(cfg, world_size, has_cuda=cuda)
    assert cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp == world_size


@pytest.mark.parametrize("overrides, world_size, cuda", [
    (["model.recompute=true", "model.recompute_granularity=selective"], 1, False),
    (["optim.overlap_grad_reduce=true", "optim.ddp_bucket_size=100000"], 2, False),  # works over gloo
    (["parallel.fsdp=true", "optim.distributed_optimizer=false", "parallel.cp=2", "parallel.fsdp_shard_size=2",
      "train.global_batch_size=16"], 8, False),
    (["optim.overlap_grad_reduce=true", "optim.overlap_param_gather=true", "checkpoint.ema_decay=0"], 2, False),
    (["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers=1"], 1, True),
    (["model.fp8=e4m3", "model.linear_backend=te", "optim.fp8_param_gather=true", "optim.overlap_grad_reduce=true",
      "optim.overlap_param_gather=true", "checkpoint.ema_decay=0"], 1, True),
    (["model.fp8=e4m3", "model.fp8_recipe=mxfp8", "parallel.cp=2", "data.kind=latent", "train.micro_batch_size=1",
      "data.stages=[{steps: 100, token_budget: 14592}]"], 2, True),
])
def test_performance_settings_pass(overrides, world_size, cuda):
    cfg = load_config(None, overrides)
    validate(cfg, world_size, has_cuda=cuda)


@pytest.mark.parametrize("overrides, world_size, cuda", [
    (["lora.rank=3", "lora.base=runs/goku-8b", "parallel.tp=2", "parallel.pp=2", "train.global_batch_size=4"],
     4, False),
    (["lora.rank=8", "lora.base=seed", "lora.targets=[final]", "lora.dropout=0.1", "model.i2v=true",
      "data.image_ratio=0"], 1, False),
    (["lora.rank=8", "lora.base=base.safetensors", "model.fp8=e4m3", "parallel.fsdp=true",
      "optim.distributed_optimizer=false", "train.global_batch_size=16"], 2, True),
])
def test_lora_settings_pass(overrides, world_size, cuda):
    """The rank need not divide by TP (lora.py replicates the adapters' low-rank side); FP8 bases."""
    cfg = load_config(None, overrides)
    validate(cfg, world_size, has_cuda=cuda)


def test_gpu_backends_pass_with_cuda():
    cfg = load_config(None, ["model.attention_backend=flash", "model.linear_backend=te",
                             "parallel.distributed_backend=nccl"])
    validate(cfg, 1, has_cuda=True)
    assert cfg.parallel.dp == 1


@pytest.mark.parametrize("recipe", available_recipes())
def test_packaged_recipes_validate(recipe):
    """On their own layout (recipes with parallel.auto: 64 GPUs, test_recipes.py plans the rest)."""
    cfg = load_config(recipe, [])
    p = cfg.parallel
    world_size = 64 if p.auto else p.tp * p.pp * p.cp
    resolve_layout(cfg, world_size)
    validate(cfg, world_size, has_cuda=True)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_validate(preset):
    validate(load_config(None, [f"model.preset={preset}"]), 1)


@pytest.mark.parametrize("world_size", [0, -2])
def test_validate_rejects_nonpositive_world_size(world_size):
    """world 0 once divided by zero in the global-batch rule; world -2 gave parallel.dp=-2."""
    cfg = load_config(None, [])
    with pytest.raises(ConfigError):
        validate(cfg, world_size)


@pytest.mark.parametrize("overrides, field", [
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.global_batch_size=-8"], "train.global_batch_size"),
    (["data.toy_size=0"], "data.toy_size"),
    (["data.toy_frames=0"], "data.toy_frames"),
])
def test_validate_rejects_nonpositive_sizes(overrides, field):
    """`x % n == 0` holds for x=0 and negative multiples: the positivity rules must catch them."""
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as excinfo:
        validate(cfg, 1)
    assert field in _error(excinfo)


# --------------------------------------------------------------------------------------------
# Loading: presets, YAML, overrides

TABLE_1 = {  # docs/model.md, "Model sizes" (paper, Table 1): layers, hidden, FFN, heads
    "goku-1b": (28, 1152, 4608, 16),
    "goku-2b": (28, 1792, 7168, 28),
    "goku-8b": (40, 3072, 12288, 48),
}


@pytest.mark.parametrize("preset", sorted(TABLE_1))
def test_presets_match_table_1(preset):
    m = load_config(None, [f"model.preset={preset}"]).model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_heads) == TABLE_1[preset]
    assert m.preset == preset
    # Shared by the paper's models: latent channels 16, patch 1x2x2, FLAN-T5 XL width 2048.
    assert (m.in_channels, m.patch_size, m.text_dim) == (16, [1, 2, 2], 2048)


def test_explicit_model_fields_override_the_preset(tmp_path):
    m = load_config(None, ["model.preset=goku-2b", "model.num_layers=2"]).model
    assert (m.num_layers, m.hidden_size, m.num_heads) == (2, 1792, 28)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: goku-8b\n  num_heads: 24\n")
    m = load_config(str(recipe), []).model
    assert (m.num_layers, m.hidden_size, m.num_heads) == (40, 3072, 24)


def test_cli_overrides_beat_yaml(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("train:\n  steps: 50\n  name: from-yaml\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(str(recipe), ["train.steps=7"])
    assert cfg.train.steps == 7
    assert cfg.train.name == "from-yaml"  # untouched YAML values survive
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.global_batch_size == Config().train.global_batch_size  # defaults fill the rest


def test_yaml_path_without_yaml_suffix(tmp_path):
    recipe = tmp_path / "recipe.conf"
    recipe.write_text("train:\n  steps: 9\n")
    assert load_config(str(recipe), []).train.steps == 9


def test_empty_yaml_gives_defaults(tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing here\n")
    assert load_config(str(recipe), []).to_dict() == load_config(None, []).to_dict()


def test_toy_recipe_values():
    cfg = load_config("toy", [])
    assert (cfg.model.in_channels, cfg.model.patch_size, cfg.data.image_ratio) == (3, [2, 2, 2], 0.0)
    assert cfg.train.name == "toy"


def test_override_value_types():
    cfg = load_config(None, ["model.patch_size=[1,2,2]", "optim.lr=1e-4", "train.steps=20",
                             "model.zero_init=false", "model.recompute=true", "optim.clip_grad=2",
                             "train.name=run1", "flow.caption_dropout=0.2"])
    assert cfg.model.patch_size == [1, 2, 2] and all(type(s) is int for s in cfg.model.patch_size)
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1e-4  # YAML reads 1e-4 as a string
    assert type(cfg.train.steps) is int and cfg.train.steps == 20
    assert cfg.model.zero_init is False and cfg.model.recompute is True
    assert type(cfg.optim.clip_grad) is float and cfg.optim.clip_grad == 2.0  # int -> float field
    assert cfg.train.name == "run1"
    assert cfg.flow.caption_dropout == pytest.approx(0.2)


def test_parse_overrides_nests():
    assert parse_overrides(["train.steps=3", "train.name=x", "model.patch_size=[1, 2, 2]"]) == {
        "train": {"steps": 3, "name": "x"}, "model": {"patch_size": [1, 2, 2]}}
    assert parse_overrides(["train.run_dir="]) == {"train": {"run_dir": ""}}


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes' \(did you mean 'train.steps'\?\)") as e:
        load_config(None, ["train.stpes=3"])
    _error(e)
    with pytest.raises(ConfigError, match=r"unknown key 'modle' \(did you mean 'model'\?\)"):
        load_config(None, ["modle.num_layers=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.zzzzzz'; valid: steps, global_batch_size"):
        load_config(None, ["train.zzzzzz=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "bad_key.yaml"
    recipe.write_text("model:\n  num_layers: 4\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(recipe), [])
    message = _error(excinfo)
    assert message.startswith(f"{recipe}: ")
    assert "did you mean 'model.hidden_size'?" in message


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "bad_type.yaml"
    recipe.write_text("train:\n  steps: lots\n")
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got 'lots'") as excinfo:
        load_config(str(recipe), [])
    assert _error(excinfo).startswith(f"{recipe}: ")


def test_bad_yaml_syntax_names_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  num_layers: 4\n bad: : x\n")
    with pytest.raises(ConfigError, match=r"line 3 is not valid YAML") as excinfo:
        load_config(str(recipe), [])
    assert _error(excinfo).startswith(str(recipe))


def test_non_mapping_yaml(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=r"a recipe must be a mapping of sections") as excinfo:
        load_config(str(recipe), [])
    assert _error(excinfo).startswith(str(recipe))


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", r"train.steps must be an integer, got 'abc'"),
    ("train.steps=1.5", r"train.steps must be an integer, got 1.5"),
    ("train.steps=true", r"train.steps must be an integer, got True"),
    ("model.zero_init=maybe", r"model.zero_init must be true or false, got 'maybe'"),
    ("model.zero_init=1", r"model.zero_init must be true or false, got 1"),
    ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    ("model.patch_size=2", r"model.patch_size must be a list, got 2"),
    ("model.patch_size=[1,a,2]", r"model.patch_size must be an integer, got 'a'"),
    ("train.name=[a,b]", r"train.name must be a string"),
])
def test_wrong_type_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as excinfo:
        load_config(None, [override])
    _error(excinfo)


@pytest.mark.parametrize("override", ["train.steps", "=5", ".steps=1", "train.=1", ""])
def test_override_syntax(override):
    with pytest.raises(ConfigError, match=r"is not key=value: write e.g. train.steps=20") as excinfo:
        load_config(None, [override])
    assert f"'{override}'" in _error(excinfo)


def test_override_with_two_equals_signs():
    # The value is everything after the first '=': it still has to fit the field.
    with pytest.raises(ConfigError, match=r"unknown key 'a'"):
        load_config(None, ["a=b=c"])
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got '1=2'"):
        load_config(None, ["train.steps=1=2"])


def test_override_inside_a_value():
    with pytest.raises(ConfigError, match=r"sets a field inside 'steps', which is a value"):
        load_config(None, ["train.steps=5", "train.steps.x=1"])


def test_unknown_preset_lists_valid():
    with pytest.raises(ConfigError, match=r"model.preset 'goku-3b' is unknown; use one of") as excinfo:
        load_config(None, ["model.preset=goku-3b"])
    message = _error(excinfo)
    assert all(name in message for name in MODEL_PRESETS)


def test_unknown_preset_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "preset.yaml"
    recipe.write_text("model:\n  preset: goku-3b\n")
    with pytest.raises(ConfigError, match=r"model.preset 'goku-3b' is unknown") as excinfo:
        load_config(str(recipe), [])
    assert _error(excinfo).startswith(f"{recipe}: ")


def test_unknown_recipe_lists_valid(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown recipe 'no-such-recipe': use a YAML path or one of") as e:
        load_config("no-such-recipe", [])
    assert all(name in _error(e) for name in available_recipes())
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing.yaml: recipe file not found \(no such file or directory\); "
                       r"pass an existing YAML file or one of " + re.escape(", ".join(available_recipes()))):
        load_config(str(missing), [])


def test_a_directory_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    """A folder toy/ or a run directory goku-2b/ in the working directory (a job that restarts
    with --config goku-2b next to its run dir) still means the packaged recipe; so does a file
    without a YAML suffix. An existing YAML file is the user's recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    (tmp_path / "goku-2b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "toy-shapes").write_text("train:\n  steps: 3\n")
    for name in ("toy", "goku-2b", "toy-shapes"):
        assert load_config(name, []).to_dict() == load_config(str(RECIPES_DIR / f"{name}.yaml"), []).to_dict(), name
    (tmp_path / "toy.yaml").write_text("train:\n  steps: 3\n")
    assert load_config("toy.yaml", []).train.steps == 3


def test_a_directory_is_not_a_recipe_file(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "runs"), [])
    assert _error(e).startswith(f"{tmp_path / 'runs'}: a directory, not a recipe file; pass an existing YAML "
                                "file or one of goku-2b")


@pytest.mark.parametrize("section", ["train", "parallel", "optim", "flow", "data"])
def test_section_given_a_scalar(section):
    with pytest.raises(ConfigError, match=rf"'{section}' is a section: give it as {section}.FIELD=VALUE") as e:
        load_config(None, [f"{section}=3"])
    _error(e)


@pytest.mark.parametrize("override", ["model=3", "model=abc", "model.preset=[1]"])
def test_model_section_given_a_scalar(override):
    with pytest.raises(ConfigError, match=r"model"):
        load_config(None, [override])


# --------------------------------------------------------------------------------------------
# Saved configs (checkpoints, exported weights): back through the loader's coercion

SAVED = "runs/a/checkpoints/iter_0000003"
ANOTHER_VERSION = ("another version of goku-megatron saved it (or it was edited): load it with the version "
                   "that saved it")


@pytest.mark.parametrize("recipe", available_recipes())
def test_a_saved_config_round_trips(recipe):
    """cfg.to_dict() (a checkpoint's common state, and as JSON an exported file's metadata) back to
    a Config gives cfg, stages and all."""
    cfg = load_config(recipe, [])
    assert config_from_dict(cfg.to_dict(), SAVED) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict())), SAVED) == cfg


def test_a_validated_config_round_trips():
    cfg = load_config("toy", [])
    validate(cfg, 1)  # fills parallel.dp and the toy's derived stage, as a saved run's config has them
    assert config_from_dict(cfg.to_dict(), SAVED) == cfg


@pytest.mark.parametrize("section, key, value", [
    ("train", "steps", "20"),  # a string where an int belongs: refused
    ("model", "zero_init", "false"),
    ("model", "patch_size", [1, "2", 2]),
    ("optim", "lr", "1e-4"),  # a number as a string: coerced, as YAML's 1e-4 is
    ("data", "stages", [{"steps": 1, "fps": "8"}]),
])
def test_a_saved_config_is_coerced_as_yaml_is(tmp_path, section, key, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({section: {key: value}}))
    saved = Config().to_dict()
    saved[section][key] = value
    try:
        from_yaml = load_config(str(recipe), [])
    except ConfigError as err:
        with pytest.raises(ConfigError) as excinfo:
            config_from_dict(saved, SAVED)
        assert _error(excinfo) == f"{SAVED}: saved config: {str(err)[len(f'{recipe}: '):]}; {ANOTHER_VERSION}"
    else:
        assert config_from_dict(saved, SAVED) == from_yaml


@pytest.mark.parametrize("where, dotted", [
    (("model",), "model.fp8_margin"),
    (("data", "stages", 0), "data.stages[0].fp8_margin"),
    ((), "fp8_margin"),
])
def test_an_unknown_key_from_another_version_is_one_line(where, dotted):
    """A key this version does not have (a field since removed, or one a newer version added) is
    refused in one line naming the checkpoint, the key and what to do; no spelling is suggested."""
    cfg = load_config("toy", [])
    validate(cfg, 1)
    saved = cfg.to_dict()
    node = saved
    for step in where:
        node = node[step]
    node["fp8_margin"] = 0
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(saved, SAVED)
    assert _error(excinfo) == (f"{SAVED}: saved config: unknown key '{dotted}', a field this version does not "
                               f"have; {ANOTHER_VERSION}")


def test_a_field_added_since_a_config_was_saved_takes_its_default():
    saved = Config().to_dict()
    del saved["model"]["i2v"], saved["train"]["wandb_mode"]
    assert config_from_dict(saved, SAVED) == Config()


def test_saved_config_overrides_replace_saved_values():
    saved = load_config(None, ["parallel.tp=2", "parallel.fsdp=true"]).to_dict()
    cfg = config_from_dict(saved, SAVED, overrides={"parallel": {"tp": 1, "fsdp": False}})
    assert (cfg.parallel.tp, cfg.parallel.fsdp) == (1, False)
    with pytest.raises(ConfigError, match=r"saved config: parallel.tp must be an integer, got 'one'"):
        config_from_dict(saved, SAVED, overrides={"parallel": {"tp": "one"}})


def test_a_saved_config_that_is_not_a_mapping():
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict([1, 2], "m.safetensors (goku_config metadata)")
    assert _error(excinfo).startswith("m.safetensors (goku_config metadata): saved config is a list, not a mapping")


# --------------------------------------------------------------------------------------------
# goku-train --dry-run


def _dry_run(capsys, argv: list[str]) -> tuple[int, str, str]:
    from goku_megatron.cli.train import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _parameters(out: str) -> int:
    match = re.search(r"^parameters=([\d,]+) \(([\d.]+) B\)$", out, re.MULTILINE)
    assert match, out
    return int(match.group(1).replace(",", ""))


def _section(out: str, title: str) -> str:
    return out.split(f"# {title}\n", 1)[1].split("\n# ", 1)[0]


def test_dry_run_report(capsys):
    rc, out, err = _dry_run(capsys, ["--dry-run"])
    assert rc == 0, err
    assert out.splitlines()[0] == "# resolved config"
    expected = load_config("toy", [])
    validate(expected, 1)
    assert yaml.safe_load(_section(out, "resolved config")) == expected.to_dict()
    assert re.search(r"^world_size=1 tp=1 pp=1 cp=1 dp=1 sharding='ddp' layers_per_stage=4 micro_batches_per_step=1 "
                     r"micro_batch_size=16 global_batch_size=16$", out, re.MULTILINE), out
    backends = _section(out, "backends")
    assert "attention=sdpa linear=local" in backends
    assert "device=cpu" in backends and "distributed=gloo" in backends and "precision=fp32" in backends
    from goku_megatron.model.goku import count_parameters

    assert _parameters(out) == count_parameters(expected.model)


def test_dry_run_layout(capsys):
    rc, out, err = _dry_run(capsys, ["--dry-run", "--config", "toy", "--world-size", "4",
                                     "parallel.tp=2", "parallel.pp=2"])
    assert rc == 0, err
    assert re.search(r"^world_size=4 tp=2 pp=2 cp=1 dp=1 sharding='ddp' layers_per_stage=2 ", out, re.MULTILINE), out
    assert "\n  dp: 1\n" in _section(out, "resolved config")


def test_dry_run_fsdp_layout(capsys):
    rc, out, err = _dry_run(capsys, ["--dry-run", "--config", "toy", "--world-size", "8", "parallel.cp=2",
                                     "parallel.fsdp=true", "optim.distributed_optimizer=false",
                                     "parallel.fsdp_shard_size=4", "train.micro_batch_size=4"])
    assert rc == 0, err
    assert re.search(r"^world_size=8 tp=1 pp=1 cp=2 dp=4 sharding='fsdp over 4 ranks x 2 replicas' ", out,
                     re.MULTILINE), out


def test_dry_run_world_size_from_env(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc, out, err = _dry_run(capsys, ["--dry-run", "train.micro_batch_size=4"])
    assert rc == 0, err
    assert re.search(r"^world_size=4 tp=1 pp=1 cp=1 dp=4 sharding='ddp' layers_per_stage=4 micro_batches_per_step=1 ",
                     out, re.MULTILINE), out


@pytest.mark.parametrize("argv, fragment", [
    (["--dry-run", "train.stpes=3"], "did you mean 'train.steps'?"),
    (["--dry-run", "train.steps"], "is not key=value"),
    (["--dry-run", "--world-size", "4", "parallel.tp=3"], "world size 4 is not divisible by tp*pp*cp=3"),
    (["--dry-run", "--config", "nope"], "unknown recipe 'nope'"),
    (["train.steps=0"], "train.steps must be positive"),  # checked before any run starts
])
def test_config_errors_exit_2(capsys, argv, fragment):
    rc, out, err = _dry_run(capsys, argv)
    assert rc == 2
    assert err.startswith("goku-train: error: ")
    assert fragment in err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "# resolved config" not in out


# --------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("preset, low, high", [("goku-2b", 1.8e9, 2.2e9), ("goku-8b", 7.5e9, 8.5e9)])
def test_dry_run_parameter_count(capsys, tmp_path, preset, low, high):
    from goku_megatron.model.goku import count_parameters

    recipe = tmp_path / f"{preset}.yaml"
    recipe.write_text(f"model:\n  preset: {preset}\n")
    rc, out, err = _dry_run(capsys, ["--dry-run", "--config", str(recipe)])
    assert rc == 0, err
    printed = _parameters(out)
    assert low <= printed <= high
    assert printed == count_parameters(load_config(str(recipe), []).model)
    assert re.search(rf"\({printed / 1e9:.2f} B\)$", out, re.MULTILINE)
    # The same model through a CLI override on top of no recipe file.
    assert count_parameters(load_config(None, [f"model.preset={preset}"]).model) == printed


def test_dry_run_goku_8b_layout(capsys, tmp_path):
    recipe = tmp_path / "8b.yaml"
    recipe.write_text("model:\n  preset: goku-8b\n")
    rc, out, err = _dry_run(capsys, ["--dry-run", "--config", str(recipe), "--world-size", "64",
                                     "parallel.tp=8", "parallel.pp=4", "train.global_batch_size=64"])
    assert rc == 0, err
    assert re.search(r"^world_size=64 tp=8 pp=4 cp=1 dp=2 sharding=.ddp, distributed optimizer. layers_per_stage=10 micro_batches_per_step=8 ",
                     out, re.MULTILINE), out


@pytest.mark.parametrize("preset, low, high", [("goku-2b", 1.8e9, 2.2e9), ("goku-8b", 7.5e9, 8.5e9)])
def test_dry_run_preset_override_on_default_recipe(capsys, preset, low, high):
    from goku_megatron.model.goku import count_parameters

    rc, out, err = _dry_run(capsys, ["--dry-run", f"model.preset={preset}"])
    assert rc == 0, err
    printed = _parameters(out)
    assert low <= printed <= high
    assert printed == count_parameters(load_config("toy", [f"model.preset={preset}"]).model)


def test_cli_preset_replaces_the_recipe_shape():
    """A preset named on the command line picks the architecture over the recipe's shape fields;
    the recipe's other model fields and later explicit CLI fields still apply."""
    m = load_config("toy", ["model.preset=goku-2b"]).model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_heads) == TABLE_1["goku-2b"]
    assert (m.in_channels, m.patch_size) == (3, [2, 2, 2])  # from toy.yaml
    assert m.text_dim == 2048  # FLAN-T5 XL width belongs to the goku presets
    m = load_config("toy", ["model.preset=goku-2b", "model.num_layers=2"]).model
    assert (m.num_layers, m.hidden_size) == (2, 1792)
    m = load_config("toy", ["model.num_layers=2"]).model  # no CLI preset: the recipe shape stays
    assert (m.num_layers, m.hidden_size) == (2, 128)


def test_dataclass_defaults_equal_the_default_preset():
    assert Config() == load_config(None, [])


def test_stages_parse_and_schedule():
    cfg = load_config(None, ["data.kind=latent", "train.micro_batch_size=1",
                             "data.stages=[{name: s288, steps: 60, height: 288, width: 512}, "
                             "{name: s480, steps: 40, height: 480, width: 864, image_ratio: 0.1}]"])
    validate(cfg, 1)
    assert [s.name for s in cfg.data.stages] == ["s288", "s480"]
    assert cfg.data.stages[1].width == 864 and cfg.data.stages[1].frames == 33  # default kept
    assert [cfg.data.stage_at(step)[0] for step in (1, 60, 61, 100, 130)] == [0, 0, 1, 1, 1]


def test_stage_unknown_field_names_its_index():
    with pytest.raises(ConfigError, match=r"unknown key 'data.stages\[1\].hieght' \(did you mean 'data.stages\[1\].height'"):
        load_config(None, ["data.stages=[{steps: 1}, {hieght: 3}]"])


# --------------------------------------------------------------------------------------------
# checkpoint: fault tolerance settings


def test_checkpoint_defaults_validate():
    cfg = load_config(None, [])
    validate(cfg, 1)
    c = cfg.checkpoint
    assert (c.resume, c.keep_last, c.async_save, c.ema_decay) == ("auto", 3, True, 0.9999)
    assert (c.max_bad_steps, c.spike_factor, c.spike_window, c.fault_tolerance) == (5, 10.0, 50, False)
    assert cfg.optim.distributed_optimizer is True
    assert cfg.to_dict()["checkpoint"]["resume"] == "auto"


@pytest.mark.parametrize("override, hint", [
    ("checkpoint.keep_last=-1", r"checkpoint.keep_last must be >= 0 \(0 keeps all\), got -1"),
    ("checkpoint.ema_decay=1", r"checkpoint.ema_decay must be in \[0, 1\) \(0 disables EMA\), got 1.0"),
    ("checkpoint.ema_decay=-0.5", r"checkpoint.ema_decay must be in \[0, 1\)"),
    ("checkpoint.max_bad_steps=0", r"checkpoint.max_bad_steps must be >= 1, got 0"),
    ("checkpoint.spike_factor=0.5", r"checkpoint.spike_factor must be > 1 \(0 disables spike logging\), got 0.5"),
    ("checkpoint.spike_window=0", r"checkpoint.spike_window must be >= 1, got 0"),
    ("checkpoint.resume=/no/such/run", r"checkpoint.resume=/no/such/run: no such file or directory; give a run "
                                       r"directory or its checkpoints/iter_N, 'auto' \(continue train.run_dir\) "
                                       r"or '' \(start fresh\)"),
    ("checkpoint.async_save=maybe", r"checkpoint.async_save must be true or false"),
])
def test_checkpoint_rules(override, hint):
    with pytest.raises(ConfigError, match=hint) as excinfo:
        validate(load_config(None, [override]), 1)
    _error(excinfo)


@pytest.mark.parametrize("resume", ["auto", "", "''"])
def test_checkpoint_resume_modes(resume):
    cfg = load_config(None, [f"checkpoint.resume={resume}"])
    validate(cfg, 1)
    assert cfg.checkpoint.resume == ("auto" if resume == "auto" else "")


def test_fault_tolerance_needs_nvidia_resiliency_ext(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nvidia_resiliency_ext" else real(name, *a))
    with pytest.raises(ConfigError, match=r"checkpoint.fault_tolerance=true needs nvidia-resiliency-ext: pip "
                                          r"install nvidia-resiliency-ext and launch with its ft_launcher"):
        validate(load_config(None, ["checkpoint.fault_tolerance=true"]), 1)


def test_resume_flag_sets_checkpoint_resume(capsys, tmp_path):
    rc, out, err = _dry_run(capsys, ["--dry-run", "--resume", str(tmp_path)])
    assert rc == 0, err
    resolved = yaml.safe_load(_section(out, "resolved config"))
    assert resolved["checkpoint"]["resume"] == str(tmp_path)
    rc, out, err = _dry_run(capsys, ["--dry-run", "--resume", str(tmp_path / "missing")])
    assert rc == 2 and err.strip().startswith(f"goku-train: error: checkpoint.resume={tmp_path / 'missing'}: ")
