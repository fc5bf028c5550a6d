"""The Goku transformer layer (docs/model.md, "The block") on megatron-core tensor-parallel linears.

Attribute names follow the reference block (norm1.linear, attn1.q_proj, ...) so checkpoints map
one to one. Activations are [s, b, hidden] as everywhere in megatron. Under tensor parallelism the
Q/K/V projections are column-parallel (heads split across ranks) and the output projections
row-parallel; the QK RMSNorm is over the *full* inner dimension, so its sum of squares is all-reduced
across the tensor-parallel group. Under context parallelism ``s`` is this rank's share of the tokens
and ``LayerInputs`` holds that share's sample indices, RoPE angles and attention segments; only the
self-attention core communicates (goku_megatron.model.context_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from goku_megatron.config import fp8_align_size
from goku_megatron.model.context_parallel import PackedSegments, RowRuns
from goku_megatron.model.rope import Rotation, apply_rope


@dataclass
class LayerInputs:
    """Everything a layer needs besides the hidden states and the (per-sample) timestep embedding,
    computed once per micro-batch.

    ``rows`` (host ints) says which sample each token of a packed sequence belongs to, so each
    sample's modulation applies to its own tokens (``per_sample``). Without packing it is None and
    the timestep embedding has one row per batch element. ``rope`` holds the rotation's (cos,
    sin), [S, B or 1, 1, hd/2]. With context parallelism S is this rank's tokens; ``packed_self``
    describes the sequence the self-attention core attends (see its backend) and ``packed_cross``
    this rank's queries against ``context``.
    """

    context: torch.Tensor
    rope: Rotation
    context_mask: torch.Tensor | None = None
    rows: RowRuns | None = None
    packed_self: PackedSegments | None = None
    packed_cross: PackedSegments | None = None

    def per_sample(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        """``fn(tokens, *rows)``, an elementwise function of tokens and of per-sample rows, with
        every token against its own sample's rows: x [S, B, F] and rows [N, 1, F] -> [S, B, F].

        Packed (B = 1), each block of ``rows.blocks`` views its tokens as [k, L, F] and
        broadcasts rows[r0:r0+k] over them, as a dense batch would: nothing per token is gathered
        or materialised, and the rows' gradient is a sum over each view (a segment sum, not a
        scatter). Several blocks (equal clips then padding: two) are concatenated. Unpacked, row b
        applies to batch element b.
        """
        if self.rows is None:
            return fn(x, *(r.transpose(0, 1) for r in rows))
        blocks = self.rows.blocks
        outputs, start = [], 0
        for first, count, length in blocks:
            tokens = x if len(blocks) == 1 else x[start:start + count * length]
            if count > 1:
                tokens = tokens.reshape(count, length, x.shape[-1])
            picked = [r if (first, count) == (0, r.shape[0]) else r[first:first + count] for r in rows]
            out = fn(tokens, *picked)
            outputs.append(out.reshape(count * length, 1, out.shape[-1]) if count > 1 else out)
            start += count * length
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the tensor-parallel group in forward *and* backward.

    The backward all-reduce is what a full-width norm needs: each rank's output depends on every
    rank's inputs through the shared statistic (megatron's reduce_from_tensor_model_parallel_region
    has an identity backward, which would be wrong here).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        torch.distributed.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


class RMSNorm(torch.nn.Module):
    """RMSNorm with a learned weight, computed in float32, over the last dimension.

    ``tensor_parallel=True`` makes it a full-width norm over features split across TP ranks: the
    weight is this rank's slice and the mean of squares covers all ranks' features.
    """

    def __init__(self, local_size: int, eps: float, tensor_parallel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.tensor_parallel = tensor_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
        self.sharded = tensor_parallel
        self.weight = torch.nn.Parameter(torch.ones(local_size))
        if tensor_parallel:
            set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """A full-width norm's weight is split over TP ranks like the projection it follows.

        Both groups are passed: megatron-core 0.16 takes a missing tp_group as TP rank 0 when
        dp_cp_group is given, which marks every TP rank as the main replica of a replicated norm.
        """
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(keep_vars=True), prefix, {"weight": 0} if self.sharded else None,
            sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_sq = xf.pow(2).mean(-1, keepdim=True)
        if self.tensor_parallel:  # every rank holds as many features: the mean of the ranks' means
            mean_sq = _AllReduceSum.apply(mean_sq) / parallel_state.get_tensor_model_parallel_world_size()
        out = xf * torch.rsqrt(mean_sq + self.eps) * self.weight.float()
        return out.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in float32 (docs/model.md, "The block": modulation math in fp32)."""
    return (x.float() * (1 + scale) + shift).to(x.dtype)


def gated(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate * h in float32, the branch a gated residual adds (in float32 too)."""
    return gate * h.float()


@dataclass
class GokuLayerSubmodules:
    """Leaf classes: the TE spec and the local spec differ only here.

    ``self_attention`` is built with the TransformerConfig and sees this rank's tokens under context
    parallelism (it declares the token layout it needs as ``cp_layout``); ``cross_attention`` is a
    local backend (queries local, keys and values the whole caption).
    """

    column_linear: type
    row_linear: type
    self_attention: type | ModuleSpec
    cross_attention: type | ModuleSpec


class AdaLNModulation(MegatronModule):
    """SiLU -> Linear(D, n*D) on the timestep embedding; output gathered over TP (per sample)."""

    def __init__(self, config: TransformerConfig, linear: type, chunks: int) -> None:
        super().__init__(config)
        self.chunks = chunks
        self.linear = linear(
            config.hidden_size, chunks * config.hidden_size, config=config,
            init_method=config.init_method, bias=True, gather_output=True,
        )

    def forward(self, silu_temb: torch.Tensor) -> list[torch.Tensor]:
        """silu_temb [N, D] -> ``chunks`` per-sample rows [N, 1, D] (``LayerInputs.per_sample``'s
        form), float32."""
        mod, _ = self.linear(silu_temb)
        return list(mod.float().unsqueeze(1).chunk(self.chunks, dim=-1))


class GokuAttention(MegatronModule):
    """Multi-head attention with full-width QK RMSNorm and 3D RoPE; self or cross."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: GokuLayerSubmodules,
        kv_dim: int,
        rope_q: bool,
        rope_k: bool,
        core: torch.nn.Module,
    ) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.head_dim = hidden // config.num_attention_heads
        self.rope_q, self.rope_k = rope_q, rope_k
        col = dict(config=config, init_method=config.init_method, bias=False, gather_output=False,
                   skip_bias_add=False, is_expert=False)
        self.q_proj = submodules.column_linear(hidden, hidden, **col)
        self.k_proj = submodules.column_linear(kv_dim, hidden, **col)
        self.v_proj = submodules.column_linear(kv_dim, hidden, **col)
        self.o_proj = submodules.row_linear(
            hidden, hidden, config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )
        self.q_norm = RMSNorm(hidden // tp, config.layernorm_epsilon, tensor_parallel=True)
        self.k_norm = RMSNorm(hidden // tp, config.layernorm_epsilon, tensor_parallel=True)
        self.core = core

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        rope: Rotation,
        key_mask: torch.Tensor | None = None,
        packed: PackedSegments | None = None,
    ) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x)[0])
        k, v = self._project_kv(kv)
        k = self.k_norm(k)
        q = q.view(*q.shape[:2], self.heads, self.head_dim)
        k = k.view(*k.shape[:2], self.heads, self.head_dim)
        v = v.view(*v.shape[:2], self.heads, self.head_dim)
        if self.rope_q:
            q = apply_rope(q, rope)
        if self.rope_k:
            k = apply_rope(k, rope)

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.core(q, k, v, key_mask=key_mask, packed=packed)

        if self.config.recompute_granularity == "selective" and self.training:
            # megatron's "core_attn" recompute: keep q, k, v and recompute softmax(QK^T)V in the
            # backward pass. An unfused kernel (SDPA's math backend) would keep an S x S matrix
            # per head; fused kernels (flash, TE) keep only their output and softmax statistics,
            # so there it saves little.
            out = tensor_parallel.checkpoint(core, False, q, k, v)
        else:
            out = core(q, k, v)
        return self.o_proj(out.flatten(2))[0]

    def _project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V projections of the key tokens [n, b, kv_dim].

        Under FP8, TE's GEMMs need the rows to be a multiple of 16 (32 for MXFP8). The video
        tokens are (config validation), but a caption has as many tokens as it has: zero tokens
        pad it for the projections, which have no bias and so map them to zero, and are dropped.
        """
        n = kv.shape[0]
        pad = -n % fp8_align_size(self.config.fp8_recipe) if self.config.fp8 else 0
        if not pad:
            return self.k_proj(kv)[0], self.v_proj(kv)[0]
        kv = F.pad(kv, (0, 0, 0, 0, 0, pad))
        return self.k_proj(kv)[0][:n], self.v_proj(kv)[0][:n]


class GokuMLP(MegatronModule):
    """Linear(D, F, bias) -> GELU(tanh) -> Linear(F, D, bias), column then row parallel."""

    def __init__(self, config: TransformerConfig, submodules: GokuLayerSubmodules) -> None:
        super().__init__(config)
        self.fc1 = submodules.column_linear(
            config.hidden_size, config.ffn_hidden_size, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.fc2 = submodules.row_linear(
            config.ffn_hidden_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
            skip_bias_add=False, is_expert=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)[0], approximate="tanh"))[0]


class GokuLayer(MegatronModule):
    """adaLN-Zero self-attention, ungated cross-attention to text, modulated gated MLP."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: GokuLayerSubmodules,
        layer_number: int = 1,
        cross_attn_rope_q: bool = True,
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        eps = config.layernorm_epsilon
        # TE's column-parallel linear cannot gather its output; adaLN runs per sample, so the local
        # layer costs nothing measurable here in either spec.
        self.norm1 = AdaLNModulation(config, ColumnParallelLinear, chunks=6)
        self.attn1 = GokuAttention(config, submodules, config.hidden_size, rope_q=True, rope_k=True,
                                   core=build_module(submodules.self_attention, config=config))
        self.norm2 = RMSNorm(config.hidden_size, eps)
        self.attn2 = GokuAttention(config, submodules, config.hidden_size, rope_q=cross_attn_rope_q, rope_k=False,
                                   core=build_module(submodules.cross_attention))
        self.norm3 = RMSNorm(config.hidden_size, eps)
        self.mlp = GokuMLP(config, submodules)
        self.eps = eps

    def forward(self, x: torch.Tensor, inputs: LayerInputs, silu_temb: torch.Tensor) -> torch.Tensor:
        """x [S, B, D]; silu_temb = SiLU(timestep embedding), [N, D] per sample."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(silu_temb)
        each = inputs.per_sample  # modulation and gates apply per sample
        h = each(modulate, F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype), shift_msa, scale_msa)
        h = self.attn1(h, h, inputs.rope, packed=inputs.packed_self)
        x = (x.float() + each(gated, h, gate_msa)).to(x.dtype)
        h = self.attn2(self.norm2(x), inputs.context, inputs.rope, key_mask=inputs.context_mask,
                       packed=inputs.packed_cross)
        x = x + h
        h = self.mlp(each(modulate, self.norm3(x), shift_mlp, scale_mlp))
        # Ends in an add, so the output is not a view (FSDP2 hooks each layer's output for its
        # backward and warns about views).
        return (x.float() + each(gated, h, gate_mlp)).to(x.dtype)
