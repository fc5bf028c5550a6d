"""GokuModel: patch embedding + conditioning -> Goku layers -> final adaLN layer -> velocity.

Pipeline parallelism splits the layers into stages: the first stage owns the patch embedding, the
last the final layer. The conditioning embedders (timestep MLP and caption projection) are needed by
every layer, so every stage holds a replica; megatron's finalize_model_grads all-reduces their
gradients over the pipeline group (params marked ``pipeline_parallel``, config.has_cond_embedder),
the way megatron-core's diffusion models keep such embedders in sync.

Weights are initialised per parameter from a generator seeded by (seed, global parameter name), then
sliced for this rank: the model starts from the same weights under any TP/PP/DP layout.

The input is always a Patch n' Pack sequence (goku_megatron/batch.py): samples with their own grids,
timesteps and captions, where attention stays inside each sample through cu_seqlens and adaLN
modulation is per sample. A batch of same-shape clips is a pack of equal segments.

Context parallelism: every CP rank receives the whole pack and runs the layers on its share of the
tokens (goku_megatron.model.context_parallel); the last stage returns that share's velocity
tokens, which train.forward_step scores against the same share of the targets (flow.flow_loss).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from contextlib import nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.enums import Fp8Recipe, ModelType
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from goku_megatron.batch import Pack
from goku_megatron.config import ModelConfig
from goku_megatron.model import context_parallel, lora
from goku_megatron.model.layer import LayerInputs, modulate
from goku_megatron.model.rope import rope_angles, rope_rotation
from goku_megatron.model.specs import cp_layout

# Layers a finetune may add to the model it starts from (checkpoint.init_from, lora.base): a
# checkpoint may lack them, and they keep their initialisation (model.i2v's image_cond starts as
# the identity on the noisy tokens); a LoRA finetune trains them in full.
NEW_LAYERS = ("image_cond.",)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps in [0, 1] (scaled by 1000 as in DiT): [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(torch.nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, freq_dim: int, hidden: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = torch.nn.Linear(freq_dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(features)))


class CaptionProjection(torch.nn.Module):
    """Text-encoder outputs -> hidden size (Linear -> GELU(tanh) -> Linear)."""

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(text_dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(text.to(self.fc1.weight.dtype)), approximate="tanh"))


class FinalLayer(torch.nn.Module):
    """adaLN (shift, scale) -> LayerNorm without affine -> Linear to patch_volume * channels."""

    def __init__(self, hidden: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.adaln = torch.nn.Linear(hidden, 2 * hidden)
        self.linear = torch.nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """x [S, 1, D]; silu_temb [N, D] per sample; ``inputs`` maps packed tokens to samples."""
        shift, scale = self.adaln(silu_temb).float().unsqueeze(1).chunk(2, dim=-1)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.linear(inputs.per_sample(modulate, h, shift, scale))


class GokuModel(MegatronModule):
    """One pipeline stage of the Goku transformer (the whole model when pp = 1)."""

    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        spec: ModuleSpec,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # No input/output weight tying (finalize_model_grads asks first/last PP stages).
        self.share_embeddings_and_output_weights = False
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.patch = tuple(model_cfg.patch_size)
        self.cp_layout = cp_layout(spec)
        hidden = config.hidden_size
        patch_dim = model_cfg.in_channels * model_cfg.patch_volume

        self.t_embedder = TimestepEmbedder(model_cfg.timestep_freq_dim, hidden)
        self.caption_embedder = CaptionProjection(model_cfg.text_dim, hidden)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for module in (self.t_embedder, self.caption_embedder):
            for param in module.parameters():
                param.pipeline_parallel = True  # grads all-reduced across PP stages
                # One replica per stage: megatron's grad norm (and so clipping) skips `shared` ones.
                param.shared = pp_rank > 0
        if pre_process:
            if model_cfg.i2v:  # starts as the identity on the noisy tokens (see _initial_value)
                self.image_cond = torch.nn.Linear(2 * patch_dim, patch_dim)
            self.patch_embed = torch.nn.Linear(patch_dim, hidden)
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        layers_per_stage = config.num_layers // pp
        self.layer_offset = parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=self.layer_offset + i + 1,
                         cross_attn_rope_q=model_cfg.cross_attn_rope_q)
            for i in range(layers_per_stage)
        )
        if post_process:
            self.final_layer = FinalLayer(hidden, patch_dim, config.layernorm_epsilon)
        self.input_tensor: torch.Tensor | None = None
        self._shards: dict[int, tuple[Pack, context_parallel.PackShard]] = {}

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Called by megatron's schedules with the activation received from the previous stage."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def prepare(self, packs: list[Pack]) -> None:
        """Work out this CP rank's share of each of a step's packs (host arithmetic, asynchronous
        copies) before the step's forward passes, so that they find it ready (``pack_shard``)."""
        cp, rank = context_parallel.cp_world()
        self._shards = {id(p): (p, context_parallel.shard_pack(p, self.cp_layout, cp, rank)) for p in packs}

    def pack_shard(self, pack: Pack) -> context_parallel.PackShard:
        """This CP rank's share of a pack (the whole pack without CP). The forward pass and the
        loss (or the sampler's gather) of one micro-batch ask for the same pack's share: the shares
        of the packs last ``prepare``d, or else of the last pack asked for, are kept, so each is
        worked out once."""
        kept = self._shards.get(id(pack))
        if kept is None or kept[0] is not pack:
            self.prepare([pack])
        return self._shards[id(pack)][1]

    def forward(self, pack: Pack) -> torch.Tensor:
        """Predict the velocity of every token of a packed sequence of ``pack.budget`` tokens.

        Returns velocity tokens [S, 1, patch_dim] (float32) on the last stage, hidden states
        [S, 1, D] on the others; S is always the pack's budget, so pipeline p2p shapes are fixed
        (seq_length=budget, micro_batch_size=1). Every stage receives the same pack (past the
        first only its layout and conditioning are used). ``batch.unpack`` turns the tokens back
        into per-sample latents; ``flow.flow_loss`` scores them. With context parallelism S is this
        rank's share of the pack's laid-out sequence (``pack_shard``).
        """
        shard = self.pack_shard(pack)
        if self.pre_process:
            tokens = shard.gather(pack.noisy)
            if self.model_cfg.i2v:
                if pack.cond is None:
                    raise ValueError("model.i2v needs packs built with each sample's first-frame condition")
                tokens = self._condition(tokens, shard.gather(pack.cond))
            x = self.patch_embed(tokens.to(self.patch_embed.weight.dtype)).unsqueeze(1)
        else:
            x = self.input_tensor
        silu_temb = F.silu(self.t_embedder(pack.timesteps))
        inputs = self._packed_inputs(pack, shard)
        x = self._run_layers(x, inputs, silu_temb)
        if not self.post_process:
            return x
        # A copy even in fp32: the linear's output is a view, and FSDP2 hooks the model's output.
        return self.final_layer(x, silu_temb, inputs).to(torch.float32, copy=True)

    def _condition(self, tokens: torch.Tensor, cond_tokens: torch.Tensor) -> torch.Tensor:
        """I2V: noisy and first-frame tokens concatenated on channels, mapped back to patch_dim."""
        dtype = self.image_cond.weight.dtype
        return self.image_cond(torch.cat([tokens.to(dtype), cond_tokens.to(dtype)], dim=-1))

    def _packed_inputs(self, pack: Pack, shard: context_parallel.PackShard) -> LayerInputs:
        """Per-token RoPE from each sample's own grid (its cos and sin once, for every layer);
        varlen self- and cross-attention segments.

        The captions' valid tokens are packed back to back (picked by ``pack.text_index``, not by
        a boolean mask, whose result size the host would have to wait for; offsets
        ``pack.cu_seqlens_text``), so each sample's video tokens see only their own caption; the
        shard picks the captions of the samples its tokens belong to. The padding segment gets a single all-zero text token
        appended after the captions: a segment needs a key for its softmax, and a zero key and
        value (the projections have no bias, RMSNorm keeps 0 at 0) make that cross-attention output
        exactly zero.
        """
        text = pack.text.flatten(0, 1).index_select(0, pack.text_index)
        context = self.caption_embedder(text)
        context = torch.cat([context, context.new_zeros(1, context.shape[-1])])
        start, end = shard.text_range
        angles = rope_angles(shard.positions, self.config.hidden_size // self.config.num_attention_heads,
                             self.model_cfg.rope_theta)
        return LayerInputs(context=context[start:end].unsqueeze(1), rope=rope_rotation(angles.unsqueeze(1)),
                           rows=shard.rows, packed_self=shard.packed_self, packed_cross=shard.packed_cross)

    def _run_layers(self, x: torch.Tensor, inputs: LayerInputs, silu_temb: torch.Tensor) -> torch.Tensor:
        """The stage's layers in megatron's FP8 context (model.fp8), each one recomputed in the
        backward pass under full recompute.

        This loop stands in for megatron's TransformerBlock, so it applies the block's FP8 rule:
        the delayed recipe reduces amax over one FP8 region around all layers; the other recipes
        enter the context per layer, where ``get_fp8_context`` keeps the model.fp8_bf16_layers at
        either end in bf16. Without FP8 both contexts are no-ops. FP8 is a training speed-up: in
        eval mode (sampling, evaluation) the layers run in bf16, which takes any token count
        (TE's FP8 GEMMs need multiples of 16) and keeps FP8 rounding out of the samples.
        """
        fp8 = bool(self.config.fp8) and self.training
        per_layer = fp8 and self.config.fp8_recipe != Fp8Recipe.delayed
        full_recompute = self.config.recompute_granularity == "full" and self.training
        if full_recompute and torch.is_grad_enabled() and not x.requires_grad:
            # megatron's checkpoint is reentrant: it hands gradients to the weights inside it only
            # when an input requires grad, and behind a frozen patch embedding (LoRA) none does.
            x = x.detach().requires_grad_()
        with get_fp8_context(self.config) if fp8 and not per_layer else nullcontext():
            for layer in self.layers:
                run = self._run_layer(layer, inputs, per_layer)
                if not full_recompute:
                    x = run(x, silu_temb, inputs.context)
                elif fp8:  # TE's checkpoint restores the FP8 state for the recomputation
                    from megatron.core.extensions.transformer_engine import te_checkpoint

                    x = te_checkpoint(run, False, tensor_parallel.get_cuda_rng_tracker,
                                      parallel_state.get_tensor_model_parallel_group(), x, silu_temb, inputs.context)
                else:
                    x = tensor_parallel.checkpoint(run, False, x, silu_temb, inputs.context)
        return x

    @staticmethod
    def _run_layer(layer: torch.nn.Module, inputs: LayerInputs, fp8_per_layer: bool):
        """One layer as a function of the tensors that carry gradients (the checkpoint arguments
        under activation recompute), inside its own FP8 context when the recipe has one per layer
        (so a recomputation re-enters it, as megatron's checkpointed block does)."""
        def run(x: torch.Tensor, silu_temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            with get_fp8_context(layer.config, layer.layer_number - 1) if fp8_per_layer else nullcontext():
                return layer(x, dataclasses.replace(inputs, context=context), silu_temb)

        return run

    # ----------------------------------------------------------------------------------------
    # Names, initialisation, checkpointing

    def global_name(self, name: str) -> str:
        """Parameter name with the stage-local layer index replaced by the global one."""
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            return f"layers.{self.layer_offset + int(idx)}.{rest}"
        return name

    def init_weights(self, seed: int) -> None:
        """Layout-independent init: each full parameter from its own seeded generator, then sliced."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, param in self.named_parameters():
                gname = self.global_name(name)
                full_shape = list(param.shape)
                dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
                if dim is not None:
                    full_shape[dim] *= tp
                full = self._initial_value(gname, full_shape, seed)
                if dim is not None:
                    full = full.chunk(tp, dim=dim)[tp_rank]
                param.copy_(full)

    def _initial_value(self, name: str, shape: list[int], seed: int) -> torch.Tensor:
        cfg = self.model_cfg
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        if lora.is_adapter(name):  # before zero_init: an adapter of a zero-initialised layer needs its A
            return lora.initial_value(name, shape, gen)
        zero_init = cfg.zero_init and (name.startswith("final_layer.") or ".norm1.linear." in name)
        if name.endswith("bias") or zero_init:
            return torch.zeros(shape)
        if name == "image_cond.weight":  # [I | 0]: an I2V model starts as the T2V model it finetunes
            return torch.cat([torch.eye(shape[0]), torch.zeros(shape[0], shape[1] - shape[0])], dim=1)
        if name.endswith("norm.weight") or name.endswith(("norm2.weight", "norm3.weight")):
            return torch.ones(shape)
        std = cfg.init_std
        if name.endswith(("o_proj.weight", "fc2.weight")) and name.startswith("layers."):
            std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # megatron's scaled output init
        return torch.randn(shape, generator=gen) * std

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Checkpoint keys use global layer indices, so a checkpoint does not depend on the PP layout.

        The replicated conditioning embedders exist on every PP stage; only stage 0 is their main
        replica (replica_id's first entry is the PP rank).
        """
        sharded: ShardedStateDict = {}
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for name, module in self.named_children():
            if name == "layers":
                for i, layer in enumerate(module):
                    sharded.update(layer.sharded_state_dict(
                        f"{prefix}layers.{self.layer_offset + i}.", sharded_offsets, metadata))
                continue
            sub = _default_sharded(module, f"{prefix}{name}.", sharded_offsets, metadata)
            if name in ("t_embedder", "caption_embedder"):
                for tensor in sub.values():
                    tensor.replica_id = (pp_rank, *tensor.replica_id[1:])
            sharded.update(sub)
        return sharded


def _default_sharded(module: torch.nn.Module, prefix: str, offsets: tuple, metadata: dict | None) -> ShardedStateDict:
    # tp_group explicitly: without it megatron-core 0.16 gives every TP rank replica TP index 0,
    # so a replicated embedder has several main replicas and the save fails validation.
    return sharded_state_dict_default(module, prefix, offsets, metadata,
                                      tp_group=parallel_state.get_tensor_model_parallel_group())


def iter_stage_models(model: list[torch.nn.Module]) -> Iterator[GokuModel]:
    """Unwrap DDP / Float16Module wrappers."""
    for chunk in model:
        while not isinstance(chunk, GokuModel):
            chunk = chunk.module
        yield chunk


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the whole model (all stages, embedders counted once), from the shapes alone,
    so --dry-run can report goku-8b without allocating it."""
    d, f, c = cfg.hidden_size, cfg.ffn_hidden_size, cfg.in_channels * cfg.patch_volume
    attn = 4 * d * d + 2 * d  # q, k, v, o (no bias) + full-width q/k norm weights
    layer = (d * 6 * d + 6 * d) + 2 * attn + 2 * d + (d * f + f + f * d + d)
    embed = (cfg.timestep_freq_dim * d + d + d * d + d) + (cfg.text_dim * d + d + d * d + d)
    patch_in = c * d + d + (2 * c * c + c if cfg.i2v else 0)
    final = (d * 2 * d + 2 * d) + (d * c + c)
    return cfg.num_layers * layer + embed + patch_in + final
