"""Config -> megatron TransformerConfig -> GokuModel: the one place a model is built, for training
(this rank's pipeline stage in megatron DDP, or sharded by FSDP: model/fsdp.py), sampling (one
unsharded model), tests and benchmarks."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from goku_megatron.config import Config
from goku_megatron.model.fsdp import ShardedDataParallel
from goku_megatron.model.goku import NEW_LAYERS, GokuModel
from goku_megatron.model.lora import apply_lora
from goku_megatron.model.specs import layer_spec
from goku_megatron.platform import Backends


def build_transformer_config(cfg: Config, backends: Backends, initialize: bool = True) -> TransformerConfig:
    """megatron's TransformerConfig for ``cfg``'s model and layout on ``backends``; without
    ``initialize`` megatron leaves the weights it allocates uninitialised (they are loaded next)."""
    m, p = cfg.model, cfg.parallel
    bf16 = backends.precision == "bf16"
    recompute = m.recompute_granularity if m.recompute else None
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_heads,
        layernorm_epsilon=m.norm_eps,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        cp_comm_type=p.cp_comm_type,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=backends.device == "cpu",
        # megatron sets the tensor-parallel attributes of its linears only in its init path, so a
        # model to train initialises first; GokuModel.init_weights then overwrites every weight,
        # layout-free. A model whose weights are loaded next (TP=1: no attribute is read) skips
        # both, and so never needs megatron's CUDA RNG tracker.
        perform_initialization=initialize,
        init_method_std=m.init_std,
        # Batched isend/irecv over gloo is not reliable; NCCL batches them.
        batch_p2p_comm=backends.distributed == "nccl",
        # GokuModel and GokuLayer read these: "full" checkpoints each layer, "selective" each
        # core attention (megatron's own options, so its validation applies).
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        recompute_modules=["core_attn"] if recompute == "selective" else None,
        # No CUDA graphs; megatron's default ("full") is deprecated and warns at every build.
        cuda_graph_scope=[],
        # FP8 through TE: GokuModel enters megatron's fp8 context around each layer (fp8_utils).
        fp8=m.fp8 or None,
        fp8_recipe=m.fp8_recipe,
        fp8_param=cfg.optim.fp8_param_gather,
        first_last_layers_bf16=m.fp8_bf16_layers > 0,
        num_layers_at_start_in_bf16=m.fp8_bf16_layers,
        num_layers_at_end_in_bf16=m.fp8_bf16_layers,
    )
    tc.has_cond_embedder = True  # finalize_model_grads syncs the replicated embedders over PP
    return tc


def build_stage(cfg: Config, backends: Backends, tc: TransformerConfig, seed: int | None,
                pre_process: bool = True, post_process: bool = True) -> MegatronModule:
    """One pipeline stage of GokuModel on the run's device, in its precision: initialised from
    ``seed`` (None: weights are loaded next, so none are initialised), and in bf16 wrapped in
    megatron's Float16Module (bf16 weights; fp32 in and out of the stage), exactly as training runs
    it; with lora.rank, LoRA adapters on the lora.targets layers and the rest frozen (model/lora.py).
    Every model goku builds (training, sampling, evaluation, conversion, benchmarks) is one."""
    # optim.fp8_param_gather: TE creates its linears' weights as FP8 tensors (a no-op context
    # otherwise). Without grad, TE keeps no high-precision copy of megatron's initial values,
    # so the optimizer's fp32 main weights start from the FP8 weights that init_weights wrote.
    with torch.no_grad(), get_fp8_context(tc, is_init=True):
        stage = GokuModel(tc, cfg.model, layer_spec(backends.linear, backends.attention),
                          pre_process=pre_process, post_process=post_process)
    if cfg.lora.rank:  # adapters before the weights are set: init_weights covers them, by name
        apply_lora(stage, cfg.lora, tc, trained_in_full=NEW_LAYERS)
    if seed is not None:
        stage.init_weights(seed)
    if cfg.model.compile:  # in place: parameter and checkpoint names stay those of the eager layer
        for layer in stage.layers:
            layer.compile(fullgraph=True, backend=cfg.model.compile_backend)
    module: MegatronModule = stage.to(backends.torch_device())
    return Float16Module(tc, module) if tc.bf16 else module


def build_model(cfg: Config, backends: Backends) -> tuple[list[torch.nn.Module], TransformerConfig]:
    """This rank's pipeline stage for training, initialised from ``train.seed`` and wrapped in
    megatron DDP or, with parallel.fsdp, sharded by megatron's FSDP2 wrapper; with its
    TransformerConfig."""
    o = cfg.optim
    tc = build_transformer_config(cfg, backends)
    module = build_stage(cfg, backends, tc, cfg.train.seed, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage())
    if cfg.parallel.fsdp:
        return [ShardedDataParallel(tc, module, cfg.parallel)], tc
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=o.distributed_optimizer,
        overlap_grad_reduce=o.overlap_grad_reduce, overlap_param_gather=o.overlap_param_gather,
        fp8_param_gather=o.fp8_param_gather, bucket_size=o.ddp_bucket_size or None,
    )
    return [DistributedDataParallel(config=tc, ddp_config=ddp_config, module=module)], tc


def build_unsharded_model(cfg: Config, backends: Backends) -> MegatronModule:
    """The whole GokuModel in this process (TP=PP=CP=1) in the run's precision, uninitialised: a
    sampler or converter loads its weights next (checkpoint.load_model_weights)."""
    return build_stage(cfg, backends, build_transformer_config(cfg, backends, initialize=False), seed=None)
